// The live map page in headless Chromium against a real `dongflow demo`.
//
//   DONGFLOW_BIN=target/debug/dongflow node tests/browser/map_page.mjs
//
// Environment: DONGFLOW_BIN (the binary), CHROMIUM (default /usr/bin/chromium), ARTIFACTS (screenshots and
// figures, default target/browser-artifacts), DISTRICTS_DIR (the real maps; their checks are skipped
// when it is unset). Exits non-zero on the first failed check. `cargo test --test map_page` runs it.
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const BIN = process.env.DONGFLOW_BIN;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = process.env.ARTIFACTS || 'target/browser-artifacts';
const DISTRICTS_DIR = process.env.DISTRICTS_DIR;
if (!BIN) throw new Error('set DONGFLOW_BIN to the dongflow binary');
mkdirSync(ARTIFACTS, { recursive: true });

const DARKEST = '#bd0026';
const EMPTY = '#eef0f2';
const ZERO = '#fffdf3';

function check(condition, message) {
  if (!condition) throw new Error('check failed: ' + message);
}

/** Polls `probe` until it returns a truthy value, or fails after `ms` with `what`. */
async function eventually(what, probe, ms = 30000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

/** Starts `dongflow demo` on a free port and resolves to its page URL and process. */
function startDemo(extra) {
  const args = ['demo', '--http', '127.0.0.1:0', '--riders', '2000', '--rate', '3000', ...extra];
  const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
  const log = [];
  createInterface({ input: child.stderr }).on('line', (l) => log.push(l));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('demo printed no Map: line; stderr:\n' + log.join('\n'))), 60000);
    child.on('exit', (code) => reject(new Error(`demo exited with ${code}; stderr:\n${log.join('\n')}`)));
    createInterface({ input: child.stdout }).on('line', (line) => {
      const m = /^Map: (http:\/\/\S+)/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve({ url: m[1], child });
      }
    });
  });
}

async function stop(demo) {
  if (demo.child.exitCode !== null) return;
  const exited = new Promise((r) => demo.child.on('exit', r));
  demo.child.kill('SIGTERM');
  await exited;
}

async function getJson(url) {
  const r = await fetch(url);
  check(r.ok, `${url} answered ${r.status}`);
  return r.json();
}

/** A viewport point over district `code` that hits its own path (not a neighbour drawn on top). */
async function pointOver(page, code) {
  return page.evaluate((code) => {
    const path = window.dongflowMap.paths.get(code);
    path.scrollIntoView({ block: 'center' });
    const r = path.getBoundingClientRect();
    for (let n = 4; n <= 64; n *= 2) {
      for (let i = 1; i < n; i++) {
        for (let j = 1; j < n; j++) {
          const x = r.left + (r.width * i) / n;
          const y = r.top + (r.height * j) / n;
          if (document.elementFromPoint(x, y) === path) return [x, y];
        }
      }
    }
    return null;
  }, code);
}

/** Fills of every district path, by code. */
const fills = (page) => page.evaluate(() => Object.fromEntries(
  [...window.dongflowMap.paths].map(([code, p]) => [code, p.getAttribute('fill')])));

/** True when the district with the greatest value of the chosen measure has the darkest fill. */
const colourFollowsCounts = (page) => page.evaluate(({ darkest, empty, zero }) => {
  const s = window.dongflowMap;
  if (!s.latest) return false;
  let top = null;
  for (const d of s.latest.districts) if (s.paths.has(d.code) && (!top || d[s.measure] > top[s.measure])) top = d;
  if (!top || !(top[s.measure] > 0)) return false;
  for (const [code, path] of s.paths) {
    const d = s.byCode.get(code);
    const fill = path.getAttribute('fill');
    // No activity, none of this measure, and some of it each have their own fills.
    if (!d && fill !== empty) return false;
    if (d && !(d[s.measure] > 0) && fill !== zero) return false;
    if (d && d[s.measure] > 0 && (fill === empty || fill === zero)) return false;
  }
  return s.paths.get(top.code).getAttribute('fill') === darkest;
}, { darkest: DARKEST, empty: EMPTY, zero: ZERO });

async function newPage(browser, options = {}) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  const errors = [];
  page.on('console', (m) => {
    // The unknown rider's 404 is an expected answer, which Chromium logs as a failed resource.
    if (m.type() === 'error' && !m.location().url.endsWith('/v1/riders/no-such-rider')) {
      errors.push(`${m.text()} (${m.location().url})`);
    }
  });
  page.on('pageerror', (e) => errors.push(String(e)));
  return { page, errors, context };
}

/** Loads the page and waits until every district is drawn and painted from an answer. */
async function load(page, url, districts) {
  const started = Date.now();
  await page.goto(url);
  await eventually('one shape per district', async () =>
    (await page.locator('svg#map path.district').count()) === districts);
  const drawn = Date.now() - started;
  await eventually('a live as_of in the status line', async () =>
    /as of \d{4}-\d\d-\d\d .* live/.test(await page.locator('#status').textContent()));
  return { drawn_ms: drawn, painted_ms: Date.now() - started };
}

async function builtInMap(browser) {
  const demo = await startDemo([]);
  try {
    const geo = await getJson(demo.url + 'v1/districts.geojson');
    const n = geo.features.length;
    const { page, errors } = await newPage(browser, { viewport: { width: 1280, height: 860 } });
    await load(page, demo.url, n);
    check(await page.locator('#count').textContent() === `${n} districts`, 'the district count is shown');
    check((await page.locator('#legend').textContent()).includes('no activity'), 'the legend tells no activity apart');
    // Names where they fit: more of them once zoomed in.
    const named = () => page.evaluate(() =>
      [...document.querySelectorAll('#labels text')].filter((t) => t.getAttribute('visibility') === 'visible').length);
    const namedWhole = await named();
    await page.click('#zoom-in');
    await page.click('#zoom-in');
    const namedZoomed = await named();
    check(namedZoomed > namedWhole && namedZoomed > 0, `names shown: ${namedWhole} on the whole map, ${namedZoomed} zoomed in`);
    await page.click('#zoom-all');

    // The page follows the district feed: what the engine shows reaches the map within 200 ms
    // (median of 10 samples), without polling.
    await eventually('the map follows the feed', async () =>
      (await page.locator('#status').textContent()).includes('pushed'));
    const delays = [];
    for (let i = 0; i < 10; i++) {
      const plain = await getJson(demo.url + 'v1/districts');
      const asked = Date.now();
      // Polled every 10 ms (not eventually's 100 ms), so the figure is the page's, not the probe's.
      while ((await page.evaluate(() => window.dongflowMap.latest.as_of)) < plain.as_of) {
        check(Date.now() - asked < 10000, `the page never reached ${plain.as_of}`);
        await new Promise((r) => setTimeout(r, 10));
      }
      delays.push(Date.now() - asked);
    }
    delays.sort((a, b) => a - b);
    const median = delays[5];
    console.log(`feed to map: median ${median} ms, max ${delays[9]} ms`);
    check(median <= 200, `a change reaches the map in ${median} ms (median), not within 200 ms`);

    // Colours follow the counts, and change when the counts change.
    await eventually('colours that follow the counts', () => colourFollowsCounts(page));
    const before = await fills(page);
    await eventually('a district changing colour', async () => {
      const now = await fills(page);
      return Object.keys(now).some((c) => now[c] !== before[c]);
    });
    await page.selectOption('#measure', 'waiting_deliveries');
    check((await page.locator('#legend .legend-title').textContent()) === 'Waiting deliveries', 'legend follows the measure');
    await eventually('colours that follow waiting deliveries', () => colourFollowsCounts(page));
    await page.selectOption('#measure', 'riders_on_shift');

    // Hover shows the district's name and every count, as the page's latest answer has them.
    const busy = await eventually('a district with riders', async () =>
      (await getJson(demo.url + 'v1/districts')).districts.find((d) => d.code !== 'unassigned' && d.riders_on_shift > 0));
    const [x, y] = await eventually('a point over ' + busy.code, () => pointOver(page, busy.code));
    await page.mouse.move(x, y);
    await eventually('the hovered district in the panel', async () =>
      (await page.locator('#district h2').textContent()).includes(busy.name));
    const shown = await page.evaluate(() => {
      const s = window.dongflowMap;
      const cells = Object.fromEntries([...document.querySelectorAll('#district td')].map((td) => [td.dataset.key, td.textContent]));
      return { cells, district: s.byCode.get(s.selected) || null, selected: s.selected };
    });
    check(shown.selected === busy.code, `hover selected ${shown.selected}, not ${busy.code}`);
    check(Object.keys(shown.cells).length === 6, 'six counts in the panel');
    for (const [key, text] of Object.entries(shown.cells)) {
      const value = shown.district ? shown.district[key] : 0;
      const expected = key === 'pressure' ? value.toFixed(2) : String(value);
      check(text === expected, `${key} shows ${text}, the answer has ${expected}`);
    }

    // The mouse wheel zooms in around the pointer; "Whole map" goes back.
    const wholeWidth = await page.evaluate(() => window.dongflowMap.whole.w);
    await page.mouse.move(x, y);
    await page.mouse.wheel(0, -300);
    await eventually('a zoomed-in view', () => page.evaluate((w) => window.dongflowMap.view.w < w, wholeWidth));
    await page.click('#zoom-all');
    check(await page.evaluate((w) => window.dongflowMap.view.w === w, wholeWidth), 'whole map again');

    // Rider search highlights the rider's district and shows its snapshot.
    const riders = await getJson(demo.url + `v1/districts/${encodeURIComponent(busy.code)}/riders`);
    check(riders.riders.length > 0, 'the busy district has riders');
    const riderId = riders.riders[0].rider_id;
    await page.fill('#rider', riderId);
    await page.press('#rider', 'Enter');
    await eventually('the rider snapshot', async () => (await page.locator('#rider-result h2').textContent()) === riderId);
    const found = await page.evaluate(() => {
      const s = window.dongflowMap;
      const code = document.querySelector('#rider-result td[data-code]').dataset.code;
      return {
        code,
        highlighted: s.highlighted,
        hasClass: s.paths.get(code) ? s.paths.get(code).classList.contains('highlight') : code === 'unassigned',
        marker: document.getElementById('rider-marker').getAttribute('visibility'),
      };
    });
    check(found.highlighted === found.code && found.hasClass, `the rider's district ${found.code} is highlighted`);
    check(found.marker === 'visible', 'the rider is marked on the map');
    await page.fill('#rider', 'no-such-rider');
    await page.press('#rider', 'Enter');
    await eventually('the not-found message', async () =>
      (await page.locator('#rider-result').textContent()) === 'No rider no-such-rider is on shift.');
    check(await page.evaluate(() => window.dongflowMap.highlighted === null), 'no highlight for an unknown rider');

    await page.fill('#rider', riderId);
    await page.press('#rider', 'Enter');
    await eventually('the rider snapshot again', async () => (await page.locator('#rider-result h2').textContent()) === riderId);
    await page.mouse.move(x, y);
    await page.screenshot({ path: join(ARTIFACTS, 'map-builtin.png') });
    check(errors.length === 0, 'console errors: ' + errors.join('; '));

    // A phone-sized screen: no sideways scrolling, and a tap shows the counts.
    const phone = await newPage(browser, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
    await load(phone.page, demo.url, n);
    const overflow = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 0, `the phone page scrolls sideways by ${overflow}px`);
    const [tx, ty] = await eventually('a point to tap', () => pointOver(phone.page, busy.code));
    await phone.page.touchscreen.tap(tx, ty);
    await eventually('the tapped district in the panel', async () =>
      (await phone.page.locator('#district h2').textContent()).includes(busy.name));
    const sheet = await phone.page.locator('#district').boundingBox();
    check(sheet && sheet.y >= 0 && sheet.y + sheet.height <= 844 + 1,
      `the tapped district's figures are in view without scrolling: ${JSON.stringify(sheet)}`);
    await phone.page.screenshot({ path: join(ARTIFACTS, 'map-phone.png'), fullPage: true });
    check(phone.errors.length === 0, 'phone console errors: ' + phone.errors.join('; '));

    // Without the feed the page polls; a stale answer (as a restarting engine gives from its
    // changelog) is shown as such. The real answer is fetched and only its `stale` flag is set,
    // since the demo is never stale.
    await page.route('**/v1/districts/changes', (route) => route.abort());
    await page.route('**/v1/districts', async (route) => {
      try {
        const response = await route.fetch();
        const body = await response.json();
        await route.fulfill({ response, json: { ...body, stale: true } });
      } catch (e) {
        await route.abort().catch(() => {});
      }
    });
    await page.reload();
    await eventually('the stale notice, polled', async () =>
      (await page.locator('#status').getAttribute('class')) === 'stale' &&
      (await page.locator('#status').textContent()).includes('STALE') &&
      (await page.locator('#status').textContent()).includes('polled'), 10000);
    await page.unroute('**/v1/districts');
    await page.unroute('**/v1/districts/changes');
    await eventually('live again, pushed', async () =>
      (await page.locator('#status').getAttribute('class')) === 'live' &&
      (await page.locator('#status').textContent()).includes('pushed'), 15000);

    // The engine goes away: the page says so plainly and keeps the last picture.
    await stop(demo);
    await eventually('the unreachable notice', async () =>
      (await page.locator('#status').getAttribute('class')) === 'down' &&
      (await page.locator('#status').textContent()).includes('The engine is unreachable'), 10000);
    const painted = Object.values(await fills(page)).filter((f) => f !== EMPTY).length;
    check(painted > 0, 'the last picture stays on the map');
    await page.screenshot({ path: join(ARTIFACTS, 'map-unreachable.png') });
    return { districts: n };
  } finally {
    await stop(demo);
  }
}

/** A real map: every district drawn, painted, and a hover answers; returns load times. */
async function realMap(browser, file, expected, name, props) {
  const demo = await startDemo(['--districts', file, ...props]);
  try {
    const { page, errors } = await newPage(browser, { viewport: { width: 1280, height: 1000 } });
    const times = await load(page, demo.url, expected);
    await eventually('colours that follow the counts', () => colourFollowsCounts(page));
    // Zoom to the districts with activity: the view shrinks to them.
    await page.click('#zoom-active');
    const view = await page.evaluate(() => ({ view: window.dongflowMap.view.w, whole: window.dongflowMap.whole.w }));
    // The simulated riders are all in Seoul: on the national map that is a small part of the whole.
    const shrinks = name === 'korea' ? view.view < view.whole / 5 : view.view <= view.whole;
    check(shrinks, `zoom to activity shows ${view.view} of ${view.whole}`);
    times.zoom = +(view.whole / view.view).toFixed(1);
    const busy = (await getJson(demo.url + 'v1/districts')).districts.find((d) => d.code !== 'unassigned' && d.riders_on_shift > 0);
    const point = await eventually('a point over ' + busy.code, () => pointOver(page, busy.code));
    const hovered = Date.now();
    await page.mouse.move(point[0], point[1]);
    await eventually('the hovered district', async () => (await page.locator('#district h2').textContent()).includes(busy.name));
    times.hover_ms = Date.now() - hovered;
    // The cost of one repaint of every district, in the page itself.
    times.repaint_ms = await page.evaluate(() => {
      const s = window.dongflowMap;
      const t = performance.now();
      for (const p of s.paths.values()) p.setAttribute('fill', '#000000');
      document.body.getBoundingClientRect();
      const sel = document.getElementById('measure');
      sel.value = 'riders_idle';
      sel.dispatchEvent(new Event('change'));
      return Math.round(performance.now() - t);
    });
    await page.screenshot({ path: join(ARTIFACTS, `map-${name}.png`) });
    check(errors.length === 0, 'console errors: ' + errors.join('; '));
    return { districts: expected, ...times };
  } finally {
    await stop(demo);
  }
}

/**
 * With --http-token-file: the page opened without a token asks for it once, draws the map with it,
 * keeps it for the tab (a reload does not ask again), and a refused token is asked for again.
 */
async function withToken(browser) {
  const dir = join(ARTIFACTS, 'token');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, 'tokens');
  writeFileSync(file, 'map-viewer-5b1e\n');
  const demo = await startDemo(['--http-token-file', file]);
  try {
    const plain = await fetch(demo.url + 'v1/districts');
    check(plain.status === 401, `no token: 401, got ${plain.status}`);
    check(/^Bearer/.test(plain.headers.get('www-authenticate') || ''), 'a Bearer challenge');
    const geo = await getJsonWith(demo.url + 'v1/districts.geojson', 'map-viewer-5b1e');
    const n = geo.features.length;
    const { page, errors } = await newPage(browser, { viewport: { width: 1280, height: 860 } });
    await page.goto(demo.url);
    await eventually('the token form', () => page.locator('#token-form').isVisible());
    check((await page.locator('svg#map path.district').count()) === 0, 'nothing drawn without a token');
    await page.fill('#token', 'not-the-token');
    await page.click('#token-form button');
    await eventually('the refused token asked again', async () =>
      (await page.locator('#token-form').isVisible()) &&
      /refused/.test(await page.locator('#token-note').textContent()));
    await page.fill('#token', 'map-viewer-5b1e');
    await page.click('#token-form button');
    await eventually('one shape per district', async () =>
      (await page.locator('svg#map path.district').count()) === n);
    await eventually('a live as_of in the status line', async () =>
      /as of \d{4}-\d\d-\d\d .* live/.test(await page.locator('#status').textContent()));
    check(!(await page.locator('#token-form').isVisible()), 'the form is gone once the token works');
    await page.reload();
    await eventually('the map drawn again after a reload', async () =>
      (await page.locator('svg#map path.district').count()) === n);
    check(!(await page.locator('#token-form').isVisible()), 'a reload does not ask again');
    await page.screenshot({ path: join(ARTIFACTS, 'map-with-token.png') });
    // Chromium logs the expected 401 answers as failed resources; anything else is a page error.
    const unexpected = errors.filter((e) => !/401/.test(e));
    check(unexpected.length === 0, 'no page errors: ' + unexpected.join('; '));
    return { districts: n };
  } finally {
    await stop(demo);
  }
}

async function getJsonWith(url, token) {
  const r = await fetch(url, { headers: { Authorization: 'Bearer ' + token } });
  check(r.ok, `${url} answered ${r.status}`);
  return r.json();
}

const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
const figures = {};
try {
  figures.builtin = await builtInMap(browser);
  console.log('built-in map: ok', JSON.stringify(figures.builtin));
  figures.token = await withToken(browser);
  console.log('map with a token: ok', JSON.stringify(figures.token));
  if (DISTRICTS_DIR) {
    const maps = [
      ['seoul', 'seoul-admdong.geojson', 425, []],
      ['korea', 'korea-admdong.geojson', 3504, ['--district-code-prop', 'code', '--district-name-prop', 'name']],
    ];
    for (const [name, file, n, props] of maps) {
      const path = join(DISTRICTS_DIR, file);
      check(existsSync(path), `${path} exists`);
      figures[name] = await realMap(browser, path, n, name, props);
      console.log(`${name} map: ok`, JSON.stringify(figures[name]));
    }
  }
} finally {
  await browser.close();
}
writeFileSync(join(ARTIFACTS, 'figures.json'), JSON.stringify(figures, null, 2) + '\n');
console.log('screenshots and figures in', ARTIFACTS);
