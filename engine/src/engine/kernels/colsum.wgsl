// Bias gradient: out[j] = sum over rows of m[row, j]. One workgroup per column; its 256
// threads stride over the rows and reduce in workgroup memory.
// p: a=rows b=cols.
@group(0) @binding(1) var<storage, read> m: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = wid.x;
    var s = 0.0;
    for (var r = lid.x; r < p.a; r += 256u) {
        s += m[r * p.b + j];
    }
    partial[lid.x] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid.x < w) { partial[lid.x] += partial[lid.x + w]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) { out[j] = partial[0]; }
}
