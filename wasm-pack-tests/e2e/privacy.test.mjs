// Differential privacy as a visitor meets it: a task with a `[privacy]` table states its
// epsilon on the contributor page before consent; once the visitor contributes, the page
// shows the epsilon spent so far; at the budget (here 4 rounds, `on_budget = "stop"`) the
// page stops sending updates and says so, and a visitor who comes back is still at the
// budget (the count is kept in the browser across visits); a second tab cannot spend
// the budget alongside the first.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, launchBrowser, webrtcPage, tempDir, pressConsent } from './harness.mjs';

const root = process.env.SHOAL_ROOT ?? new URL('../..', import.meta.url).pathname;
const BUDGET = 4;

let server;
let browser;

before(async () => {
  const dir = tempDir('shoal-dp-');
  const taskFile = join(dir, 'private.toml');
  writeFileSync(taskFile, readFileSync(join(root, 'tasks/digits.toml'), 'utf8')
    .replace('name = "digits"', 'name = "private"')
    .replace('[privacy]', `[privacy]\nclip = 1.0\nepsilon = 8.0\ndelta = 1e-5\nrounds = ${BUDGET}\non_budget = "stop"`));
  server = await startServer(['--task-file', taskFile]);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

test('the page states epsilon before consent, counts it while contributing and stops at the budget', async () => {
  const described = await (await fetch(`${server.url}/api/tasks/private`)).json();
  const dp = described.privacy;
  assert.ok(dp && dp.epsilon <= 8 && dp.epsilon > 7.9, JSON.stringify(dp));
  const plain = await (await fetch(`${server.url}/api/tasks/digits`)).json();
  assert.equal(plain.privacy, null);

  const page = await webrtcPage(browser, `${server.url}/?task=private&backend=cpu`);
  await page.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  const before = await page.textContent('#privacy');
  console.log(`before consent: ${before}`);
  assert.match(before, new RegExp(`epsilon ${dp.epsilon.toFixed(2)} and delta 0\\.00001`));
  assert.match(before, /stops sending updates/);
  await pressConsent(page);

  // Alone, it sends an update every second of training: 4 rounds spend the budget.
  await page.waitForFunction(() => window.shoalProgress.some((e) => e.privacy?.stopped), null,
    { timeout: 300_000, polling: 500 });
  const spentAt = await page.evaluate(() => window.shoalProgress.find((e) => e.privacy?.stopped));
  assert.equal(spentAt.privacy.rounds, 4);
  assert.ok(Math.abs(spentAt.privacy.epsilon - dp.epsilon) < 1e-9, JSON.stringify(spentAt.privacy));
  // Its progress along the way: epsilon rose with each round sent.
  const along = await page.evaluate(() => window.shoalProgress.filter((e) => e.privacy).map((e) => e.privacy.epsilon));
  assert.ok(along.length >= 2 && along.every((e, i) => i === 0 || e >= along[i - 1]), JSON.stringify(along));
  await page.waitForFunction(() => document.querySelector('dd[data-key="privacy"]')?.textContent.includes('budget spent'),
    null, { timeout: 30_000 });
  const row = await page.textContent('dd[data-key="privacy"]');
  console.log(`after: ${row}`);
  assert.match(row, new RegExp(`^epsilon ${dp.epsilon.toFixed(2)} of ${dp.epsilon.toFixed(2)} \\(4 of 4 rounds\\)`));
  assert.equal(await page.textContent('dd[data-key="loss"]'), 'kept on this device');
  // No more training once spent: the sample count stands still.
  const samples = await page.evaluate(() => window.shoalProgress.at(-1).samples);
  await page.waitForTimeout(3_000);
  const phase = await page.textContent('dd[data-key="phase"]');
  assert.equal(phase, 'budget spent');
  assert.equal(await page.evaluate(() => window.shoalProgress.at(-1).samples), samples);

  // A second tab of the same browser may not spend the budget alongside (a Web Lock).
  const second = await page.context().newPage();
  await second.goto(`${server.url}/?task=private&backend=cpu`);
  await second.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  await pressConsent(second);
  await second.waitForFunction(() => document.getElementById('status').textContent.includes('Another tab'),
    null, { timeout: 30_000 });
  await second.close();

  // The visitor comes back: same browser storage, same key, the budget still spent.
  await page.reload();
  await page.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  await pressConsent(page);
  await page.waitForFunction(() => document.querySelector('dd[data-key="phase"]')?.textContent === 'budget spent',
    null, { timeout: 120_000, polling: 500 });
  await page.waitForTimeout(2_000);
  assert.match(await page.textContent('dd[data-key="privacy"]'), /\(4 of 4 rounds\): budget spent/);
  assert.equal(await page.textContent('dd[data-key="samples contributed"]'), '0', 'nothing trained on the return visit');
  await page.close();
});

test('a browser that cannot keep the budget\'s count, or keep it to one tab, sends nothing uncounted', async () => {
  // Without Web Locks (a page served over plain HTTP from another address) every tab
  // would spend the whole budget: it does not start.
  const unlocked = await webrtcPage(browser, 'about:blank');
  await unlocked.addInitScript(() => { delete Navigator.prototype.locks; });
  await unlocked.goto(`${server.url}/?task=private&backend=cpu`);
  await unlocked.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  await pressConsent(unlocked);
  await unlocked.waitForFunction(() => document.getElementById('status').textContent.includes('Web Locks'),
    null, { timeout: 30_000 });
  await unlocked.waitForTimeout(2_000);
  assert.deepEqual(await unlocked.evaluate(() => window.shoalProgress ?? []), [], 'no worker trained');
  await unlocked.context().close();

  // Storage that refuses the count (full): the worker stops at its first counted round,
  // and the page says why. Its key is kept, so a later visit would have spent the
  // uncounted rounds again.
  const full = await webrtcPage(browser, 'about:blank');
  await full.addInitScript(() => {
    const set = Storage.prototype.setItem;
    Storage.prototype.setItem = function (key, value) {
      if (String(key).startsWith('shoal-privacy-')) throw new DOMException('full', 'QuotaExceededError');
      return set.call(this, key, value);
    };
  });
  await full.goto(`${server.url}/?task=private&backend=cpu`);
  await full.waitForSelector('#consent:not([disabled])', { timeout: 60_000 });
  await pressConsent(full);
  await full.waitForFunction(() => document.getElementById('status').textContent.includes('could not store'),
    null, { timeout: 120_000, polling: 250 });
  const progress = () => full.evaluate(() => window.shoalProgress.length);
  const seen = await progress();
  await full.waitForTimeout(3_000);
  assert.equal(await progress(), seen, 'the worker stopped');
  const rounds = await full.evaluate(() => Math.max(0, ...window.shoalProgress.map((e) => e.privacy?.rounds ?? 0)));
  assert.ok(rounds <= 1, `no round after the one whose count did not keep: ${rounds}`);
  await full.context().close();
});
