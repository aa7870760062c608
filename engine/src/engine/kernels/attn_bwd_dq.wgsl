// Causal attention backward, queries: each thread recomputes its query row's
// probabilities from the saved log-sum-exp (p = exp(q·k / sqrt(HD) - lse)) while the
// workgroup streams keys and values through workgroup memory, and accumulates
// dq = sum_j p (dO·v_j - D) k_j / sqrt(HD), written into the q third of dqkv.
// Grid: (ceil(ctx / 64), heads, samples). p: a=ctx b=dim c=heads.
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> dout: array<f32>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read> dd: array<f32>;
@group(0) @binding(5) var<storage, read_write> dqkv: array<f32>;

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
    let ic = min(i, ctx - 1u);
    let scale = 1.0 / sqrt(f32(HD));
    var q: array<f32, HD>;
    var g: array<f32, HD>;
    var dq: array<f32, HD>;
    let qrow = (s * ctx + ic) * 3u * dim + h * HD;
    let orow = (s * ctx + ic) * dim + h * HD;
    for (var c = 0u; c < HD; c++) {
        q[c] = qkv[qrow + c] * scale;
        g[c] = dout[orow + c];
        dq[c] = 0.0;
    }
    let row = (s * p.c + h) * ctx + ic;
    let li = lse[row];
    let di = dd[row];
    let end = min(ctx, wid.x * 64u + 64u);
    for (var j0 = 0u; j0 < end; j0 += KT) {
        stage_kv(j0, s, h, ctx, dim, lid.x);
        workgroupBarrier();
        for (var jj = 0u; jj < KT; jj++) {
            let j = j0 + jj;
            if (live && j <= i) {
                var sc = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < HD; c++) {
                    sc += q[c] * kt[jj * HD + c];
                    dp += g[c] * vt[jj * HD + c];
                }
                let ds = exp(sc - li) * (dp - di);
                for (var c = 0u; c < HD; c++) { dq[c] += ds * kt[jj * HD + c]; }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < HD; c++) { dqkv[qrow + c] = dq[c] * scale; }
    }
}
