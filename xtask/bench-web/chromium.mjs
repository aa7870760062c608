// The headless Chromium the WebRTC benchmarks drive: Debian's, loopback ICE candidates
// allowed (the benchmarks run in a network namespace with only loopback). A context needs
// the media permission too before Chromium gathers those candidates (a harness need).
import { chromium } from 'playwright-core';

export function launchWebrtcBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--allow-loopback-in-peer-connection'],
  });
}
