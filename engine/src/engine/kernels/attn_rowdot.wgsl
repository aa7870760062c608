// Attention backward, first step: D[s, h, i] = dO[s, i, head h] · O[s, i, head h], one
// thread per (sample, head, query). p: n=samples*heads*ctx a=ctx b=dim c=heads d=head_dim.
@group(0) @binding(1) var<storage, read> o: array<f32>;
@group(0) @binding(2) var<storage, read> dout: array<f32>;
@group(0) @binding(3) var<storage, read_write> dd: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let k = flat_index(wid, nwg, lid);
    if (k >= p.n) { return; }
    let i = k % p.a;
    let h = (k / p.a) % p.c;
    let s = k / (p.a * p.c);
    let base = (s * p.a + i) * p.b + h * p.d;
    var acc = 0.0;
    for (var c = 0u; c < p.d; c++) { acc += o[base + c] * dout[base + c]; }
    dd[k] = acc;
}
