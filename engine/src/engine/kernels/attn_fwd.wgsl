// Causal multi-head self-attention forward, fused with an online softmax
// (FlashAttention-style): a workgroup of 64 threads takes 64 queries of one (sample,
// head); each thread holds its query and output row in registers while the workgroup
// streams the keys and values it may see through workgroup memory, KT rows at a time.
// The T x T score matrix never exists; per query row only its log-sum-exp is kept for
// the backward pass. The host fills in HD (head width), KT and KT*HD.
// Grid: (ceil(ctx / 64), heads, samples). p: a=ctx b=dim c=heads.
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;

const HD: u32 = {{HD}}u;
const KT: u32 = {{KT}}u;
var<workgroup> kt: array<f32, {{KTHD}}>;
var<workgroup> vt: array<f32, {{KTHD}}>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let ctx = p.a;
    let dim = p.b;
    let h = wid.y;
    let s = wid.z;
    let i = wid.x * 64u + lid.x;
    let live = i < ctx;
    let scale = 1.0 / sqrt(f32(HD));
    var q: array<f32, HD>;
    var acc: array<f32, HD>;
    let qrow = (s * ctx + min(i, ctx - 1u)) * 3u * dim + h * HD;
    for (var c = 0u; c < HD; c++) {
        q[c] = qkv[qrow + c] * scale;
        acc[c] = 0.0;
    }
    var m = -3.0e38;
    var l = 0.0;
    // The last query of this block sees keys 0..end.
    let end = min(ctx, wid.x * 64u + 64u);
    for (var j0 = 0u; j0 < end; j0 += KT) {
        stage_kv(j0, s, h, ctx, dim, lid.x);
        workgroupBarrier();
        for (var jj = 0u; jj < KT; jj++) {
            let j = j0 + jj;
            if (live && j <= i) {
                var sc = 0.0;
                for (var c = 0u; c < HD; c++) { sc += q[c] * kt[jj * HD + c]; }
                let mn = max(m, sc);
                let corr = exp(m - mn);
                let pj = exp(sc - mn);
                l = l * corr + pj;
                for (var c = 0u; c < HD; c++) { acc[c] = acc[c] * corr + pj * vt[jj * HD + c]; }
                m = mn;
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let orow = (s * ctx + i) * dim + h * HD;
        for (var c = 0u; c < HD; c++) { o[orow + c] = acc[c] / l; }
        lse[(s * p.c + h) * ctx + i] = m + log(l);
    }
}
