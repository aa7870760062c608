// Shared prelude of the element-wise and gather kernels. Each kernel reads its sizes from
// the uniform `p` and runs one thread per output element, 256 per workgroup, spread over
// x and y so that large tensors stay within the 65535-workgroups-per-dimension limit.

struct Params {
    // Elements this dispatch covers.
    n: u32,
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    e: u32,
    f: u32,
    g: u32,
    h: u32,
    i: u32,
    j: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid.x;
}
