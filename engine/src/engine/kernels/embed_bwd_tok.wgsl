// Token-table gradient as a gather (no atomics): dtok[v, c] = sum of dy[r, c] over the
// rows whose token is v, one thread per entry; added to what the tied head wrote when
// p.c is 1. p: n=vocab*dim a=dim b=rows c=accumulate.
@group(0) @binding(1) var<storage, read> ids: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dtok: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let v = f32(i / p.a);
    let c = i % p.a;
    var s = 0.0;
    for (var r = 0u; r < p.b; r++) {
        if (ids[r] == v) { s += dy[r * p.a + c]; }
    }
    if (p.c == 1u) { s += dtok[i]; }
    dtok[i] = s;
}
