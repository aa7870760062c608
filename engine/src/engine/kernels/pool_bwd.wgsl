// Max-pool gradient as a gather: an input element receives its window's gradient if it
// was the window's maximum.
// p: n=batch*in_h*in_w*c a=in_h b=in_w c=channels d=out_h e=out_w f=size.
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> arg: array<u32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let ch = i % p.c;
    let ix = (i / p.c) % p.b;
    let iy = (i / (p.c * p.b)) % p.a;
    let s = i / (p.c * p.b * p.a);
    let oy = iy / p.f;
    let ox = ix / p.f;
    var g = 0.0;
    if (oy < p.d && ox < p.e) {
        let o = ((s * p.d + oy) * p.e + ox) * p.c + ch;
        if (arg[o] == i) { g = dy[o]; }
    }
    dx[i] = g;
}
