// GELU, tanh form: g = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))). p: n=elements.
@group(0) @binding(1) var<storage, read> u: array<f32>;
@group(0) @binding(2) var<storage, read_write> g: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let x = u[i];
    // tanh written out: WGSL's tanh is undefined for large arguments on some drivers.
    let z = clamp(0.7978846 * (x + 0.044715 * x * x * x), -15.0, 15.0);
    let e = exp(2.0 * z);
    g[i] = 0.5 * x * (1.0 + (e - 1.0) / (e + 1.0));
}
