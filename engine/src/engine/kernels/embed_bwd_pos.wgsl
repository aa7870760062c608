// Position-table gradient: dpos[t, c] = sum over samples of dy[s, t, c], one thread per
// entry. p: n=ctx*dim a=dim b=ctx c=samples.
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dpos: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    var s = 0.0;
    for (var k = 0u; k < p.c; k++) { s += dy[k * p.n + i]; }
    dpos[i] = s;
}
