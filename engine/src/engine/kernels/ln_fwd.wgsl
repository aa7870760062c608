// Layer norm, one thread per row of `dim` values: y = (x - mean) / sqrt(var + 1e-5) *
// gain + bias (biased variance); keeps (mean, rstd) per row. p: n=rows a=dim.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gain: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = flat_index(wid, nwg, lid);
    if (r >= p.n) { return; }
    let base = r * p.a;
    var mean = 0.0;
    for (var j = 0u; j < p.a; j++) { mean += x[base + j]; }
    mean /= f32(p.a);
    var v = 0.0;
    for (var j = 0u; j < p.a; j++) { let d = x[base + j] - mean; v += d * d; }
    let rstd = 1.0 / sqrt(v / f32(p.a) + 1e-5);
    for (var j = 0u; j < p.a; j++) {
        y[base + j] = (x[base + j] - mean) * rstd * gain[j] + bias[j];
    }
    stats[2u * r] = mean;
    stats[2u * r + 1u] = rstd;
}
