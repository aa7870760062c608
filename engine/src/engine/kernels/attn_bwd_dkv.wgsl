// Causal attention backward, keys and values: each thread holds one key and value row
// while the workgroup streams the queries that see it (with their output gradients,
// log-sum-exps and row dots D) through workgroup memory, and accumulates
// dv = sum_i p dO_i and dk = sum_i p (dO_i·v - D_i) q_i / sqrt(HD), written into the k
// and v thirds of dqkv. Grid: (ceil(ctx / 64), heads, samples). p: a=ctx b=dim c=heads.
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> dout: array<f32>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read> dd: array<f32>;
@group(0) @binding(5) var<storage, read_write> dqkv: array<f32>;

const HD: u32 = {{HD}}u;
const KT: u32 = {{KT}}u;
var<workgroup> qt: array<f32, {{KTHD}}>;
var<workgroup> gt: array<f32, {{KTHD}}>;
var<workgroup> lt: array<f32, {{KT}}>;
var<workgroup> dt: array<f32, {{KT}}>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ctx = p.a;
    let dim = p.b;
    let h = wid.y;
    let s = wid.z;
    let j = wid.x * 64u + lid.x;
    let live = j < ctx;
    let jc = min(j, ctx - 1u);
    let scale = 1.0 / sqrt(f32(HD));
    var k: array<f32, HD>;
    var v: array<f32, HD>;
    var dk: array<f32, HD>;
    var dv: array<f32, HD>;
    let krow = (s * ctx + jc) * 3u * dim + h * HD;
    for (var c = 0u; c < HD; c++) {
        k[c] = qkv[krow + dim + c];
        v[c] = qkv[krow + 2u * dim + c];
        dk[c] = 0.0;
        dv[c] = 0.0;
    }
    // Queries before this block's first key see none of its keys.
    for (var i0 = wid.x * 64u; i0 < ctx; i0 += KT) {
        for (var e = lid.x; e < KT * HD; e += 64u) {
            let i = i0 + e / HD;
            var qv = 0.0;
            var gv = 0.0;
            if (i < ctx) {
                qv = qkv[(s * ctx + i) * 3u * dim + h * HD + e % HD] * scale;
                gv = dout[(s * ctx + i) * dim + h * HD + e % HD];
            }
            qt[e] = qv;
            gt[e] = gv;
        }
        if (lid.x < KT) {
            let i = i0 + lid.x;
            var lv = 0.0;
            var dv0 = 0.0;
            if (i < ctx) {
                lv = lse[(s * p.c + h) * ctx + i];
                dv0 = dd[(s * p.c + h) * ctx + i];
            }
            lt[lid.x] = lv;
            dt[lid.x] = dv0;
        }
        workgroupBarrier();
        for (var ii = 0u; ii < KT; ii++) {
            let i = i0 + ii;
            if (live && i >= j && i < ctx) {
                var sc = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < HD; c++) {
                    sc += qt[ii * HD + c] * k[c];
                    dp += gt[ii * HD + c] * v[c];
                }
                let pr = exp(sc - lt[ii]);
                let ds = pr * (dp - dt[ii]);
                for (var c = 0u; c < HD; c++) {
                    dv[c] += pr * gt[ii * HD + c];
                    dk[c] += ds * qt[ii * HD + c];
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < HD; c++) {
            dqkv[krow + dim + c] = dk[c];
            dqkv[krow + 2u * dim + c] = dv[c];
        }
    }
}
