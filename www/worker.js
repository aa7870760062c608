// Shoal's Web Worker: loads the wasm module and runs everything heavy off the main thread.
import init, { probe } from './pkg/shoal_web_client.js';

async function main() {
  try {
    await init();
    const result = JSON.parse(await probe());
    self.postMessage({ type: 'probe', result });
  } catch (e) {
    self.postMessage({ type: 'error', message: String(e && e.message ? e.message : e) });
  }
}

main();
