// Non-overlapping max pooling, NHWC; remembers which input won.
// p: n=batch*out_h*out_w*c a=in_h b=in_w c=channels d=out_h e=out_w f=size.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> arg: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let o = flat_index(wid, nwg, lid);
    if (o >= p.n) { return; }
    let ch = o % p.c;
    let ox = (o / p.c) % p.e;
    let oy = (o / (p.c * p.e)) % p.d;
    let s = o / (p.c * p.e * p.d);
    var best = 0.0;
    var at = 0u;
    for (var ky = 0u; ky < p.f; ky++) {
        for (var kx = 0u; kx < p.f; kx++) {
            let i = ((s * p.a + oy * p.f + ky) * p.b + ox * p.f + kx) * p.c + ch;
            let v = x[i];
            if ((ky == 0u && kx == 0u) || v > best) {
                best = v;
                at = i;
            }
        }
    }
    y[o] = best;
    arg[o] = at;
}
