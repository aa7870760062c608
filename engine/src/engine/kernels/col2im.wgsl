// The adjoint of im2col as a gather (no atomics): each input element sums the patch
// gradients of every window that covers it.
// p: n=batch*in_h*in_w*in_c a=in_h b=in_w c=in_c d=out_h e=out_w f=kernel g=stride h=pad.
@group(0) @binding(1) var<storage, read> dcols: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let ch = i % p.c;
    let ix = (i / p.c) % p.b;
    let iy = (i / (p.c * p.b)) % p.a;
    let s = i / (p.c * p.b * p.a);
    let kkc = p.f * p.f * p.c;
    var sum = 0.0;
    for (var ky = 0u; ky < p.f; ky++) {
        let ty = i32(iy + p.h) - i32(ky);
        if (ty < 0 || u32(ty) % p.g != 0u) { continue; }
        let oy = u32(ty) / p.g;
        if (oy >= p.d) { continue; }
        for (var kx = 0u; kx < p.f; kx++) {
            let tx = i32(ix + p.h) - i32(kx);
            if (tx < 0 || u32(tx) % p.g != 0u) { continue; }
            let ox = u32(tx) / p.g;
            if (ox >= p.e) { continue; }
            sum += dcols[((s * p.d + oy) * p.e + ox) * kkc + (ky * p.f + kx) * p.c + ch];
        }
    }
    dx[i] = sum;
}
