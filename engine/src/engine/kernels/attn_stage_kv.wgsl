// Shared by the attention kernels that stream keys and values (forward, dq): stages keys
// and values j0 .. j0 + KT of (sample s, head h) into the workgroup tiles kt and vt, each
// of the 64 threads copying every 64th element (zeros past the context). The including
// kernel declares qkv, kt, vt, HD and KT; the caller puts a barrier after it.
fn stage_kv(j0: u32, s: u32, h: u32, ctx: u32, dim: u32, t: u32) {
    for (var e = t; e < KT * HD; e += 64u) {
        let j = j0 + e / HD;
        var kv = 0.0;
        var vv = 0.0;
        if (j < ctx) {
            let at = (s * ctx + j) * 3u * dim + h * HD + e % HD;
            kv = qkv[at + dim];
            vv = qkv[at + 2u * dim];
        }
        kt[e] = kv;
        vt[e] = vv;
    }
}
