// Shoal on sites it does not control, and against peers that lie to the dashboard: the
// widget embedded by a page on another site (localhost versus 127.0.0.1: another site,
// not only another port) in a browser that denies the widget's frame its storage, and
// the dashboard fed reports by a peer that claims absurd numbers.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { consentInFrame, startSites, visitorPage, withoutWebGpu, pressConsent } from './harness.mjs';

let server;
let host;
let browser;
let sites;
before(async () => {
  sites = await startSites();
  ({ server, host, browser } = sites);
});

after(async () => assert.equal(await sites?.stop(), 0));

const newPage = () => visitorPage(browser);

test('the widget on another site trains even where the browser denies its frame storage', async (t) => {
  // A neighbour to train with: a contributor page on Shoal's own site.
  const neighbour = await newPage();
  t.after(() => neighbour.context().close());
  await neighbour.goto(`${server.url}/?backend=cpu`);
  await neighbour.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  // It says where it trains (the CPU, as the URL asks, whatever adapter exists) and,
  // until this device has trained, that it is joining: no thanks for work not done.
  assert.equal(await neighbour.locator('#backend').getAttribute('data-state'), 'cpu');
  assert.match(await neighbour.locator('#backend').textContent(), /CPU/);
  await pressConsent(neighbour);
  assert.equal(await neighbour.locator('#status').getAttribute('data-state'), 'joining');
  assert.doesNotMatch(await neighbour.locator('#status').textContent(), /Thank you/);

  const reader = await newPage();
  t.after(() => reader.context().close());
  // What Chromium does to a cross-site frame when third-party storage is blocked: any
  // touch of localStorage throws. And this reader has no WebGPU (the CPU backend).
  await reader.route('**/embed.html*', async (route) => {
    const res = await route.fetch();
    const deny = `<script>Object.defineProperty(window, 'localStorage', { get() {
      throw new DOMException("Failed to read the 'localStorage' property from 'Window': Access is denied for this document.", 'SecurityError'); } });</script>`;
    await route.fulfill({ response: res, body: (await res.text()).replace('<head>', `<head>${deny}`) });
  });
  await withoutWebGpu(reader);
  const port = host.address().port;
  await reader.goto(`http://localhost:${port}/`);
  const frame = reader.frameLocator('iframe[title="Shoal contributor"]');
  await consentInFrame(frame);
  await frame.locator('#status').waitFor({ timeout: 30_000 });
  const frameUrl = new URL(await reader.locator('iframe[title="Shoal contributor"]').getAttribute('src'));
  assert.equal(new URL(reader.url()).hostname, 'localhost', 'the host page is on localhost');
  assert.equal(frameUrl.hostname, '127.0.0.1', 'and the widget on another site');
  const denied = await reader.frames().find((f) => f.url().includes('/embed.html'))
    .evaluate(() => { try { localStorage.length; return false; } catch { return true; } });
  assert.ok(denied, 'the frame has no storage');

  // It joins, says the identity lasts this visit only, and the rounds advance.
  const status = frame.locator('#status');
  await frame.locator('#status[data-state="running"]').waitFor({ timeout: 120_000 }).catch(async (e) => {
    const stats = await frame.locator('#stats').textContent().catch(() => '?');
    throw new Error(`${e.message}\nwidget status: ${await status.textContent()}; stats: ${stats}`);
  });
  assert.match(await status.textContent(), /this visit only/);
  const round = frame.locator('#stats [data-key="round"]');
  const first = Number(await round.textContent());
  // The frame is cross-origin to the host page: read it through Playwright.
  const deadline = Date.now() + 120_000;
  while (Number(await round.textContent()) < first + 2) {
    assert.ok(Date.now() < deadline, `rounds advance in the widget (still ${await round.textContent()})`);
    await new Promise((r) => setTimeout(r, 500));
  }
  // And it trains with the swarm, not alone: its signaling crossed sites.
  const peers = frame.locator('#stats [data-key="peers"]');
  while (Number(await peers.textContent()) < 1) {
    assert.ok(Date.now() < deadline, 'the widget trains with a neighbour');
    await new Promise((r) => setTimeout(r, 500));
  }
  assert.match(await status.textContent(), /Contributing.*this visit only/);
  // The page makes the widget transparent after consent (it could then lay a false
  // "Paused" over it): Shoal pauses within seconds, and goes on once shown again.
  await reader.evaluate(() => { document.body.style.opacity = '0.02'; });
  await frame.locator('#status[data-state="paused"]').waitFor({ timeout: 10_000 });
  assert.match(await status.textContent(), /not shown on this page/);
  await reader.evaluate(() => { document.body.style.opacity = ''; });
  await frame.locator('#status[data-state="running"]').waitFor({ timeout: 10_000 });
  // So does a page that cuts the frame down to a sliver of the status line (the Pause
  // button out of view): painted, unobscured and opaque, but not seen whole.
  const shoalFrame = reader.frames().find((f) => f.url().includes('/embed.html'));
  const sliver = await shoalFrame.evaluate(() => Math.ceil(document.getElementById('status').getBoundingClientRect().top) + 3);
  const frameHeight = (h) => reader.locator('iframe[title="Shoal contributor"]')
    .evaluate((el, h) => { el.style.height = h; }, h);
  await frameHeight(`${sliver}px`);
  await frame.locator('#status[data-state="paused"]').waitFor({ timeout: 10_000 });
  await frameHeight('190px');
  await frame.locator('#status[data-state="running"]').waitFor({ timeout: 10_000 });
  // A page that hides the widget for just under 2 s and shows it for over 1 s, again
  // and again (a carousel): Shoal is paused for most of the time it is hidden.
  await reader.evaluate(() => {
    const flip = () => {
      if (window.stopFlipping) return;
      const cover = document.body.style.opacity === '';
      document.body.style.opacity = cover ? '0.02' : '';
      setTimeout(flip, cover ? 1_800 : 1_300);
    };
    flip();
  });
  const cycleStart = Date.now();
  let hidden = 0;
  let pausedHidden = 0;
  while (Date.now() - cycleStart < 18_600) {
    const covered = await reader.evaluate(() => document.body.style.opacity !== '');
    const state = await status.getAttribute('data-state');
    if (covered && Date.now() - cycleStart > 3_100) {
      hidden += 1;
      if (state === 'paused') pausedHidden += 1;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  await reader.evaluate(() => { window.stopFlipping = true; document.body.style.opacity = ''; });
  assert.ok(hidden > 10 && pausedHidden * 2 > hidden,
    `paused in ${pausedHidden} of ${hidden} looks while the page hid it`);
  await frame.locator('#status[data-state="running"]').waitFor({ timeout: 35_000 });
  // What the page paints behind the frame does not show through it: a transparent frame
  // let a page paint the status text's colour behind the status line and the accent
  // behind the Pause button, hiding both while Shoal trained (seen, to the browser's
  // visibility report, since nothing covers them). A corner of the frame, before and
  // after the page paints black behind it.
  const shoalElement = reader.locator('iframe[title="Shoal contributor"]');
  const box = await shoalElement.boundingBox();
  const corner = { x: Math.floor(box.x + box.width) - 8, y: Math.ceil(box.y) + 2, width: 6, height: 6 };
  const unpainted = await reader.screenshot({ clip: corner });
  await shoalElement.evaluate((el) => { el.style.background = '#000'; });
  const painted = await reader.screenshot({ clip: corner });
  await shoalElement.evaluate((el) => { el.style.background = ''; });
  assert.ok(unpainted.equals(painted), 'the page\'s paint behind the frame shows through it');
  console.log(`widget on localhost, Shoal on 127.0.0.1, storage denied: round ${first} -> ${await round.textContent()}, ${await peers.textContent()} neighbour(s); paused in ${pausedHidden} of ${hidden} looks while hidden by a carousel`);
});

test('a page that wraps the widget in a frame of another origin to go unnamed is named itself', async (t) => {
  // The browser names a frame's ancestors in \`ancestorOrigins\`, the embedder first; a
  // \`data:\` frame's is "null". The widget names the last, the site in the visitor's
  // address bar: before, it named the embedder (here "unknown"; a site that framed another
  // site's page with the widget, and hid it, had the other site named).
  const page = await newPage();
  t.after(() => page.context().close());
  const sockets = [];
  page.on('websocket', (w) => sockets.push(w.url()));
  const src = `${server.url}/embed.html?task=digits&throttle=25`;
  const inner = `<!doctype html><iframe title="inner" src="${src}" style="width:200px;height:60px;border:0"></iframe>`;
  const wrapper = `http://localhost:${host.address().port}/wrapper.html`;
  await page.route(wrapper, (route) => route.fulfill({ contentType: 'text/html', body: `<!doctype html>
    <iframe id="wrap" title="wrap" style="width:240px;height:100px;border:0" src="data:text/html,${encodeURIComponent(inner)}"></iframe>` }));
  await withoutWebGpu(page);
  await page.goto(wrapper);
  await consentInFrame(page.frameLocator('#wrap').frameLocator('iframe[title="inner"]'));
  const deadline = Date.now() + 30_000;
  while (!sockets.some((u) => u.includes('/ws/')) && Date.now() < deadline) await page.waitForTimeout(200);
  const ws = sockets.find((u) => u.includes('/ws/'));
  assert.ok(ws, 'the widget joined the swarm');
  assert.equal(new URL(ws).searchParams.get('site'), `localhost:${host.address().port}`, ws);
});

test('a site that opens the widget as a popup gets the contributor page, which states the costs', async (t) => {
  // The bare widget in a small popup asked for its one click without the costs, with the
  // opener's backend and throttle, and named no site; its opener kept a hold of it.
  const page = await newPage();
  t.after(() => page.context().close());
  const opener = `http://localhost:${host.address().port}/opener.html`;
  await page.route(opener, (route) => route.fulfill({ contentType: 'text/html', body: '<!doctype html><p>A site.</p>' }));
  await page.goto(opener);
  const [popup] = await Promise.all([
    page.context().waitForEvent('page'),
    page.evaluate((src) => { window.opened = window.open(src, 'shoal', 'popup,width=320,height=220'); },
      `${server.url}/embed.html?task=digits&throttle=100&backend=cpu`),
  ]);
  await popup.waitForURL((u) => u.pathname === '/', { timeout: 30_000 });
  assert.equal(new URL(popup.url()).searchParams.get('task'), 'digits');
  assert.equal(new URL(popup.url()).searchParams.get('backend'), null, 'the opener chose no backend');
  await popup.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  assert.match(await popup.locator('#cost').textContent(), /MB/);
  assert.equal(await popup.evaluate(() => window.opener), null, 'the opener holds no reference');
});

test('a site that isolates itself (COEP require-corp) still shows the widget, and Shoal runs in it', async (t) => {
  // Sites that need SharedArrayBuffer send Cross-Origin-Embedder-Policy: require-corp;
  // their browser then loads a script or frame from another origin only if it says it
  // may be (CORP), and frames only documents that isolate themselves too.
  const page = await newPage();
  t.after(() => page.context().close());
  const isolated = `http://localhost:${host.address().port}/isolated.html`;
  await page.route(isolated, (route) => route.fulfill({
    contentType: 'text/html',
    headers: { 'Cross-Origin-Embedder-Policy': 'require-corp', 'Cross-Origin-Opener-Policy': 'same-origin' },
    body: `<!doctype html><p>An isolated page.</p><script src="${server.url}/embed.js" data-task="digits" async></script>`,
  }));
  await withoutWebGpu(page);
  await page.goto(isolated);
  assert.equal(await page.evaluate(() => self.crossOriginIsolated), true, 'the host page is isolated');
  const frame = page.frameLocator('iframe[title="Shoal contributor"]');
  await consentInFrame(frame);
  // It trains: its worker (which isolates itself too) started and took the task.
  await frame.locator('#status[data-state="running"]').waitFor({ timeout: 120_000 });
});

test('a widget whose card stated the terms of a task that changed since trains nothing', async (t) => {
  // The card states the terms of the task as the server ran it when the host page
  // loaded. Here the server runs another revision than the card's since (as after a
  // restart that raised the epsilon): the visitor agreed to the card, not to that. The
  // frame trained whatever the server ran when clicked.
  const page = await newPage();
  t.after(() => page.context().close());
  await page.route('**/embed.js', async (route) => {
    const res = await route.fetch();
    const text = await res.text();
    assert.match(text, /"revision":"[0-9a-f]{32}"/, "the card carries the task's revision");
    await route.fulfill({ response: res, body: text.replace(/"revision":"[0-9a-f]{32}"/, `"revision":"${'0'.repeat(32)}"`) });
  });
  await withoutWebGpu(page);
  await page.goto(`http://localhost:${host.address().port}/`);
  const frame = page.frameLocator('iframe[title="Shoal contributor"]');
  await consentInFrame(frame);
  await frame.locator('#status[data-state="error"]').waitFor({ timeout: 30_000 });
  assert.match(await frame.locator('#status').textContent(), /changed since its terms were shown to you/);
});

test('a peer that lies in its reports cannot inflate the dashboard', async (t) => {
  const dash = await newPage();
  t.after(() => dash.context().close());
  await dash.goto(`${server.url}/dashboard/`);
  // Four peers from a page on Shoal's site (so that the origin check lets them in): two
  // report honest numbers, two liars claim a round near 2^40, 9 million samples a
  // second, 10^15 samples and as many bytes and rejected updates; all within what the
  // server accepts.
  const peers = await newPage();
  t.after(() => peers.context().close());
  await peers.goto(`${server.url}/healthz`);
  const sent = await peers.evaluate(async (ws) => {
    const report = (version, rate, samples, bytes, norm = 1) => ({
      type: 'report',
      report: { role: 'trainer', version, samples, samples_per_s: rate, loss: 0.3, accuracy: 0.9,
        bytes_up: bytes, bytes_down: bytes, used: 3, rejected: { norm }, paused: false, backend: 'cpu' },
    });
    const liar = report(2 ** 40 - 1, 9e6, 2 ** 50, 2 ** 50, 2 ** 50);
    const reports = [report(12, 200, 5000, 1e6), report(12, 220, 5200, 1.1e6), liar, liar];
    window.sockets = [];
    const errors = [];
    for (const r of reports) {
      const s = new WebSocket(ws);
      window.sockets.push(s);
      await new Promise((resolve) => s.addEventListener('open', resolve));
      s.addEventListener('message', (e) => { const m = JSON.parse(e.data); if (m.type === 'error') errors.push(m); });
      s.send(JSON.stringify(r));
    }
    await new Promise((r) => setTimeout(r, 500));
    return errors;
  }, server.ws);
  assert.deepEqual(sent, [], 'the server accepts all three reports');
  const seen = await dash.waitForFunction(() => {
    const s = window.shoalDashboard;
    return s.peers.filter((p) => p.report).length >= 4 ? {
      round: s.round,
      rate: Number(document.getElementById('n-rate').textContent),
      rejected: document.getElementById('n-rejected').textContent,
      outliers: s.outliers.length,
      marked: document.querySelectorAll('#peers tr[data-outlier]').length,
    } : false;
  }, null, { timeout: 30_000, polling: 250 }).then((h) => h.jsonValue());
  console.log(`dashboard with one liar: ${JSON.stringify(seen)}`);
  assert.equal(seen.round, 12, 'the round is the swarm\'s, not the liars\' (half the peers)');
  assert.ok(seen.rate >= 420 && seen.rate <= 420 + 2 * 10 * 220, `each liar's rate counts at most 10x the median: ${seen.rate}`);
  // Each honest peer handled 4 updates (3 used, 1 rejected): a liar's rejected count is
  // capped at 10 times that.
  assert.equal(seen.rejected, String(1 + 1 + 40 + 40), 'each liar\'s rejected updates count at most 10x the median peer\'s updates');
  assert.equal(seen.outliers, 2, 'the liars are outliers');
  assert.equal(seen.marked, 2, 'and their rows say so');
});

test('on a phone the consent card states the cost and its buttons are on screen', async () => {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 } });
  const phone = await context.newPage();
  await phone.goto(`http://localhost:${host.address().port}/`);
  const widget = phone.locator('[data-shoal-widget="digits"]');
  await widget.waitFor();
  // The cost, from the server, in the script itself (before consent nothing else loads).
  assert.match(await widget.locator('[role="dialog"]').textContent(), /downloads \d+(\.\d)? MB once, then sends at most 80 MB an hour of updates and receives about as much, plus up to 40 MB an hour of the model for other visitors and dashboards that ask/);
  const buttons = {
    Contribute: phone.frameLocator('iframe[title="Shoal contributor"]').getByRole('button', { name: 'Contribute' }),
    'No thanks': widget.getByRole('button', { name: 'No thanks' }),
  };
  for (const [name, button] of Object.entries(buttons)) {
    const box = await button.boundingBox();
    assert.ok(box && box.x >= 0 && box.y >= 0 && box.x + box.width <= 390 && box.y + box.height <= 844,
      `${name} is on a 390x844 screen: ${JSON.stringify(box)}`);
  }
  await context.close();
});

test('where the browser cannot tell whether its frame is seen, the visitor consents in a window of Shoal\'s own', async (t) => {
  // Firefox and Safari have no IntersectionObserver v2: a page that lays the frame,
  // transparent, over a decoy gets the visitor's click on the decoy, and the frame cannot
  // tell. Chromium without it here (in every frame and window of this visitor).
  const page = await newPage();
  t.after(() => page.context().close());
  await page.context().addInitScript(() => {
    if (typeof IntersectionObserverEntry !== 'undefined') delete IntersectionObserverEntry.prototype.isVisible;
  });
  const sockets = [];
  page.on('websocket', (w) => sockets.push(w.url()));
  const port = host.address().port;
  const decoy = `http://localhost:${port}/decoy.html`;
  const src = `${server.url}/embed.html?task=digits&throttle=100`;
  await page.route(decoy, (route) => route.fulfill({ contentType: 'text/html', body: `<!doctype html>
    <p>Free video: click play</p>
    <div style="position:relative;width:200px;height:40px">
      <button style="position:absolute;inset:0">Play</button>
      <iframe id="hidden" title="hidden" src="${src}" style="position:absolute;inset:0;width:200px;height:40px;opacity:0;border:0"></iframe>
    </div>` }));
  await page.goto(decoy);
  const frame = page.frameLocator('#hidden');
  const consent = () => frame.locator('body').getAttribute('data-consent');
  await frame.getByRole('button', { name: 'Contribute', includeHidden: true }).waitFor({ state: 'attached' });
  // The visitor clicks "Play": the click lands on Shoal's button, which opens Shoal's
  // window instead of starting.
  const play = async () => {
    const box = await page.locator('#hidden').boundingBox();
    await page.mouse.move(box.x + 10, box.y + 10);
    await page.mouse.move(box.x + 30, box.y + 15, { steps: 4 });
    await page.waitForTimeout(700);
    const opened = page.context().waitForEvent('page', { timeout: 10_000 });
    await page.mouse.click(box.x + 30, box.y + 15);
    const popup = await opened;
    await frame.locator('body[data-consent="window"]').waitFor({ state: 'attached', timeout: 5_000 });
    await popup.locator('body[data-consent="asked"]').waitFor({ state: 'attached', timeout: 30_000 });
    return popup;
  };
  const first = await play();
  assert.equal(new URL(first.url()).origin, server.url, 'a window of Shoal\'s own');
  assert.equal(new URL(first.url()).pathname, '/consent.html');
  // It names the site the visitor is on (as the browser names it) and states the terms.
  assert.match(await first.locator('#lede').textContent(), new RegExp(`localhost:${port} asks you to help train`));
  assert.match(await first.locator('#cost').textContent(), /Joining downloads .* of training data once/);
  assert.match(await first.locator('#lede').textContent(), /about 100% of the time/);
  // The visitor says no: the window closes, nothing started, and the button is back.
  const declined = first.waitForEvent('close');
  await first.locator('#cancel').click();
  await declined;
  await frame.locator('body[data-consent="asked"]').waitFor({ state: 'attached', timeout: 5_000 });
  assert.deepEqual(sockets, [], 'nothing connected');
  // Again; this time the page posts the answer Shoal's window would, into the frame: it
  // comes from another origin and another window, and starts nothing.
  const second = await play();
  await page.evaluate(() => document.getElementById('hidden').contentWindow
    .postMessage({ shoal: 'consent', task: 'digits' }, '*'));
  await page.waitForTimeout(1_000);
  assert.equal(await consent(), 'window', 'the page consented for the visitor');
  assert.deepEqual(sockets, [], 'nothing connected');
  // The visitor clicks Contribute in Shoal's window: it closes, and Shoal starts in the
  // frame.
  const closed = second.waitForEvent('close');
  const yes = second.locator('#contribute:not([disabled])');
  await yes.hover();
  await second.waitForTimeout(300);
  await yes.click({ position: { x: 12, y: 10 } });
  await closed;
  await frame.locator('body[data-consent="given"]').waitFor({ state: 'attached', timeout: 5_000 });
  const deadline = Date.now() + 30_000;
  while (!sockets.some((u) => u.includes('/ws/digits'))) {
    assert.ok(Date.now() < deadline, `Shoal connects once consented (${sockets})`);
    await page.waitForTimeout(200);
  }
});

test('a site that frames Shoal itself starts nothing without a visible click in the frame', async () => {
  // A hostile page on another site frames Shoal's widget page directly (no embed.js, no
  // consent card), once plainly and once transparent over a decoy button.
  const page = await newPage();
  const fromShoal = [];
  page.on('request', (r) => { if (r.url().startsWith(server.url)) fromShoal.push(new URL(r.url()).pathname); });
  const sockets = [];
  page.on('websocket', (w) => sockets.push(w.url()));
  const evil = `http://localhost:${host.address().port}/evil.html`;
  const src = `${server.url}/embed.html?task=digits&throttle=100`;
  await page.route(evil, (route) => route.fulfill({ contentType: 'text/html', body: `<!doctype html>
    <p>Free video: click play</p>
    <input id="name" aria-label="Your name">
    <iframe id="plain" title="plain" src="${src}" style="width:200px;height:40px"></iframe>
    <div style="position:relative;width:200px;height:40px">
      <button style="position:absolute;inset:0">Play</button>
      <iframe id="hidden" title="hidden" src="${src}" style="position:absolute;inset:0;width:200px;height:40px;opacity:0;border:0"></iframe>
    </div>
    <div style="position:relative;width:200px;height:40px">
      <button style="position:absolute;inset:0">Win</button>
      <div id="peephole" style="position:absolute;left:30px;top:10px;width:20px;height:10px;overflow:hidden">
        <iframe id="window" title="window" src="${src}" style="position:absolute;left:-30px;top:-10px;width:200px;height:40px;border:0"></iframe>
      </div>
    </div>
    <iframe id="sandboxed" title="sandboxed" sandbox="allow-scripts" src="${src}" style="width:200px;height:60px"></iframe>
    <div style="position:relative;width:200px;height:40px">
      <iframe id="uncovered" title="uncovered" src="${src}" style="position:absolute;inset:0;width:200px;height:40px;border:0"></iframe>
      <button id="decoy" style="position:absolute;inset:0;background:#fff">Double-click to play</button>
    </div>
    <div style="position:relative;width:200px;height:40px">
      <iframe id="resting" title="resting" src="${src}" style="position:absolute;inset:0;width:200px;height:40px;border:0"></iframe>
      <div id="popup" style="position:absolute;inset:0;background:#fff">Double-click to continue</div>
    </div>
    <script>
      document.getElementById('decoy').addEventListener('mousedown', (e) => { e.target.style.display = 'none'; });
    </script>` }));
  await page.goto(evil);
  const plain = page.frameLocator('#plain');
  const hidden = page.frameLocator('#hidden');
  await plain.getByRole('button', { name: 'Contribute' }).waitFor();
  await hidden.getByRole('button', { name: 'Contribute', includeHidden: true }).waitFor({ state: 'attached' });
  // The host page's own scripts cannot click in the frames (another origin).
  const reached = await page.evaluate(() => {
    try { document.getElementById('plain').contentWindow.document.body.click(); return true; } catch { return false; }
  });
  assert.equal(reached, false, 'the host page cannot reach into the frame');
  // The visitor clicks "Play", which the transparent frame covers: the click lands on
  // Shoal's button, which the browser reports as not visible, and Shoal refuses it.
  await page.waitForTimeout(500);
  await page.mouse.click((await page.locator('#hidden').boundingBox()).x + 30, (await page.locator('#hidden').boundingBox()).y + 15);
  await hidden.locator('#refused:not([hidden])').waitFor({ state: 'attached' });
  assert.match(await hidden.locator('#refused').textContent(), /hides Shoal's button/);
  // "Win" shows a 20x10 speck of an opaque frame through a window (no transparency, no
  // cover): a click there lands on the button, which is not shown whole, and is refused.
  const peep = page.frameLocator('#window');
  await peep.getByRole('button', { name: 'Contribute', includeHidden: true }).waitFor({ state: 'attached' });
  await page.waitForTimeout(800);
  const speck = await page.locator('#peephole').boundingBox();
  await page.mouse.click(speck.x + 5, speck.y + 5);
  await peep.locator('#refused:not([hidden])').waitFor({ state: 'attached' });
  assert.match(await peep.locator('#refused').textContent(), /hides Shoal's button/);
  // "Double-click to play" covers an opaque frame and vanishes at the first press: the
  // second click lands on Shoal's button, uncovered a moment before. Judged by the
  // click's time, it was not visible long enough, and is refused.
  const uncovered = page.frameLocator('#uncovered');
  await uncovered.getByRole('button', { name: 'Contribute', includeHidden: true }).waitFor({ state: 'attached' });
  await page.waitForTimeout(800);
  const decoy = await page.locator('#decoy').boundingBox();
  await page.mouse.click(decoy.x + 30, decoy.y + 15);
  await page.waitForTimeout(150);
  await page.mouse.click(decoy.x + 30, decoy.y + 15);
  await uncovered.locator('body[data-consent="refused"]').waitFor({ state: 'attached', timeout: 5_000 });
  assert.match(await uncovered.locator('#refused').textContent(), /clicked as it appeared/);
  // The visitor types their name in the page's field and presses Tab, which moves the
  // focus onto Shoal's button in the next frame, and types on: the Space bar presses the
  // button as it took the focus, and that is refused.
  await page.locator('#name').focus();
  await page.keyboard.type('Ada');
  // The focus crosses into the frame (another process) a moment after the Tab: the typing
  // goes on as it lands there. (Typed at once, under load the space could reach the page
  // before the focus reached the frame, and nothing was pressed at all.)
  const focused = plain.locator('#contribute').evaluate((b) => new Promise((ok) => {
    if (document.activeElement === b) ok();
    else b.addEventListener('focus', () => ok(), { once: true });
  }));
  await page.keyboard.press('Tab');
  await focused;
  await page.keyboard.type(' Lovelace');
  await plain.locator('body[data-consent="refused"]').waitFor({ state: 'attached', timeout: 5_000 })
    .catch(async (e) => {
      const now = await plain.locator('body').evaluate((b) => `${b.dataset.consent}: ${document.getElementById('refused').textContent}`);
      throw new Error(`${e.message}; the frame's consent stands at ${now}`);
    });
  assert.match(await plain.locator('#refused').textContent(), /pressed as it took the focus/);
  // The button comes back. The visitor tabs onto it again, pauses, and types on: the
  // Space is typed onto the button among other keys, not a press of it.
  const focusOnButton = () => plain.locator('#contribute').evaluate((b) => new Promise((ok) => {
    if (document.activeElement === b) ok();
    else b.addEventListener('focus', () => ok(), { once: true });
  }));
  await plain.locator('#contribute:not([hidden])').waitFor();
  await page.locator('#name').focus();
  const onButton = focusOnButton();
  await page.keyboard.press('Tab');
  await onButton;
  await page.waitForTimeout(700);
  await page.keyboard.type('Ada Lovelace');
  await plain.locator('#refused:not([hidden])').waitFor({ state: 'attached', timeout: 5_000 });
  assert.match(await plain.locator('#refused').textContent(), /keys typed onto it/);
  // The page focuses the frame and names the button in the frame's address (its `src`
  // with a fragment, which focuses the element it names): the visitor's next Space, to
  // scroll, must not press it.
  await plain.locator('#contribute:not([hidden])').waitFor();
  await page.evaluate(() => {
    const f = document.getElementById('plain');
    f.contentWindow.focus();
    f.src = `${f.src.split('#')[0]}#contribute`;
  });
  await page.waitForTimeout(700);
  await page.keyboard.press(' ');
  await page.waitForTimeout(1_500);
  assert.equal(await plain.locator('body').getAttribute('data-consent'), 'refused',
    'a Space after the page named the button in the frame\'s address pressed nothing');
  assert.equal(await plain.locator('#refused').isHidden(), true);
  // The visitor presses on the button and drags off it (a slider of the page's that
  // starts over the frame): no click, but in Chromium a press focuses a button. Their
  // Space a moment later, for the page, must not press it.
  const pressAt = await plain.locator('#contribute').boundingBox();
  await page.mouse.move(pressAt.x + 10, pressAt.y + 10, { steps: 3 });
  await page.mouse.down();
  await page.mouse.move(pressAt.x + 600, pressAt.y + 200, { steps: 5 });
  await page.mouse.up();
  await page.waitForTimeout(700);
  await page.keyboard.press(' ');
  await page.waitForTimeout(1_500);
  assert.equal(await plain.locator('body').getAttribute('data-consent'), 'refused',
    'a Space after a press dragged off the button pressed it');
  assert.equal(await plain.locator('#refused').isHidden(), true, 'the Space pressed the button');
  // The visitor Tabs onto the button, then clicks elsewhere on the page; later the page
  // gives the frame the focus back (its script may): the Space that follows, for the
  // page, must not press the button either.
  await page.locator('#name').focus();
  const onItAgain = focusOnButton();
  await page.keyboard.press('Tab');
  await onItAgain;
  await page.mouse.click(5, 5);
  await page.waitForTimeout(300);
  await page.evaluate(() => document.getElementById('plain').contentWindow.focus());
  await page.waitForTimeout(700);
  assert.equal(await plain.locator('body').evaluate(() => document.hasFocus()), true,
    'the frame has the focus back');
  await page.keyboard.press(' ');
  await page.waitForTimeout(1_500);
  assert.equal(await plain.locator('body').getAttribute('data-consent'), 'refused',
    'a Space after the page gave the frame its focus back pressed the button');
  assert.equal(await plain.locator('#refused').isHidden(), true, 'the Space pressed the button');
  // "Double-click to continue" in a window of the page's own over the button, closed as
  // the visitor presses: the second press lands on a button visible all along, where
  // the pointer rests and never moved onto it. (Here the window is a cover that the page
  // removes while the pointer rests on it, long enough before the press.)
  const resting = page.frameLocator('#resting');
  await resting.getByRole('button', { name: 'Contribute', includeHidden: true }).waitFor({ state: 'attached' });
  const popup = await page.locator('#popup').boundingBox();
  await page.mouse.move(popup.x + 30, popup.y + 15, { steps: 3 });
  await page.evaluate(() => document.getElementById('popup').remove());
  await page.waitForTimeout(900);
  await page.mouse.down();
  await page.mouse.up();
  await resting.locator('body[data-consent="refused"]').waitFor({ state: 'attached', timeout: 5_000 })
    .catch(async (e) => {
      throw new Error(`${e.message}; the frame's consent stands at ${await resting.locator('body').getAttribute('data-consent')}`);
    });
  assert.match(await resting.locator('#refused').textContent(), /had not moved onto it/);
  // A frame without an origin of its own (a sandbox) cannot load Shoal: it says so, and
  // offers no button that would start and hang.
  const boxed = page.frameLocator('#sandboxed');
  await boxed.locator('#refused:not([hidden])').waitFor({ state: 'attached' });
  assert.match(await boxed.locator('#refused').textContent(), /sandbox that stops it/);
  await page.waitForTimeout(3_000);
  // The button's own guard (consent.js, a few lines that load nothing) is part of it.
  const started = fromShoal.filter((p) => (p.endsWith('.wasm') || p.endsWith('.js')) && p !== '/consent.js');
  assert.deepEqual(started, [], `nothing of Shoal's but its button loaded: ${JSON.stringify(fromShoal)}`);
  assert.deepEqual(sockets, [], 'no connection to the swarm');
  // A visitor who consents with the keyboard (Tab to the button, then Enter) still can,
  // with a modifier pressed on the way (a screen reader's Shift is no typing).
  await plain.locator('#contribute:not([hidden])').waitFor();
  await page.locator('#name').focus();
  await page.keyboard.press('Tab');
  await page.waitForTimeout(700);
  await page.keyboard.press('Shift');
  await page.keyboard.press('Enter');
  await plain.locator('body[data-consent="given"]').waitFor({ state: 'attached', timeout: 5_000 });
  await page.context().close();
});
