// A task's data files, downloaded and checked against the digests its description gives:
// shared by the contributor's worker and the dashboard's observer.

async function fetchBytes(path) {
  const r = await fetch(new URL(path, self.location.origin));
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

/** Downloads the files of a task's description `desc` (`files`, in order) and checks each
 * against the SHA-256 the description gives (`files_sha256`, as the server read them at
 * start): a file changed on the server since (replaced mid-run, or cut by a copy in
 * progress) is refused, not trained or evaluated on. `sha256Hex` is the worker's bundle's
 * (WebCrypto's digest exists only on secure pages, and Shoal is served over plain HTTP
 * too). */
export async function fetchTaskFiles(desc, sha256Hex) {
  const files = await Promise.all(desc.files.map(fetchBytes));
  const want = desc.files_sha256;
  if (!Array.isArray(want)) return files;
  files.forEach((bytes, i) => {
    if (sha256Hex(bytes) !== want[i]) {
      throw new Error(`${desc.files[i]} changed on the server since the task started (its SHA-256 is not the one the task gives); the server must be restarted with it`);
    }
  });
  return files;
}
