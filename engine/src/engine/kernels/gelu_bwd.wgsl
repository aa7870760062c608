// GELU backward in place: dg *= gelu'(u). p: n=elements.
@group(0) @binding(1) var<storage, read> u: array<f32>;
@group(0) @binding(2) var<storage, read_write> dg: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let x = u[i];
    let z = clamp(0.7978846 * (x + 0.044715 * x * x * x), -15.0, 15.0);
    let e = exp(2.0 * z);
    let t = (e - 1.0) / (e + 1.0);
    let d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978846 * (1.0 + 3.0 * 0.044715 * x * x);
    dg[i] = dg[i] * d;
}
