// Token plus position embedding, one thread per output value:
// y[r, c] = tok[ids[r], c] + pos[r % ctx, c]. p: n=rows*dim a=dim b=ctx.
@group(0) @binding(1) var<storage, read> ids: array<f32>;
@group(0) @binding(2) var<storage, read> tok: array<f32>;
@group(0) @binding(3) var<storage, read> pos: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let r = i / p.a;
    let c = i % p.a;
    let t = u32(ids[r]);
    y[i] = tok[t * p.a + c] + pos[(r % p.b) * p.a + c];
}
