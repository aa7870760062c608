// Convolution patches, NHWC: cols[(s, oy, ox), (ky, kx, c)] = x[s, oy*stride+ky-pad,
// ox*stride+kx-pad, c], zero outside the image.
// p: n=rows*kkc a=in_h b=in_w c=in_c d=out_h e=out_w f=kernel g=stride h=pad.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> cols: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let kkc = p.f * p.f * p.c;
    let row = i / kkc;
    let col = i % kkc;
    let ox = row % p.e;
    let oy = (row / p.e) % p.d;
    let s = row / (p.e * p.d);
    let ch = col % p.c;
    let kx = (col / p.c) % p.f;
    let ky = col / (p.c * p.f);
    let iy = i32(oy * p.g + ky) - i32(p.h);
    let ix = i32(ox * p.g + kx) - i32(p.h);
    var v = 0.0;
    if (iy >= 0 && ix >= 0 && iy < i32(p.a) && ix < i32(p.b)) {
        v = x[((s * p.a + u32(iy)) * p.b + u32(ix)) * p.c + ch];
    }
    cols[i] = v;
}
