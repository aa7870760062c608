// Raises the step's flag (status[0], shared with the loss rows) if any gradient element
// is NaN or infinite, so that the optimizer skips the whole step. p: n=parameters.
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> status: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    if (!(abs(g[i]) < 3.0e38)) { status[0] = 1.0; }
}
