// Sum of squares, for global-norm gradient clipping: workgroup w sums x[i]^2 over
// i = w*256 + t, striding by all workgroups' threads, and writes out[w]. Run twice
// (the gradients into one partial per workgroup, then the partials with one workgroup)
// it leaves the squared norm in out[0]. p: n=elements a=workgroups.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    var s = 0.0;
    for (var i = wid.x * 256u + lid.x; i < p.n; i += p.a * 256u) {
        s += x[i] * x[i];
    }
    partial[lid.x] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid.x < w) { partial[lid.x] += partial[lid.x + w]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { out[wid.x] = partial[0]; }
}
