// Unit tests of the map page's logic: `node --test server/src/page/` (run by `cargo test` too).
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const map = require('./map.js');

const square = (x0, y0, x1, y1) => ({
  type: 'Polygon',
  coordinates: [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
});
const feature = (code, geometry) => ({ type: 'Feature', properties: { code, name: code }, geometry });

test('bounds covers every ring of Polygons and MultiPolygons', () => {
  const fc = {
    features: [
      feature('a', square(126.9, 37.5, 127.0, 37.6)),
      feature('b', { type: 'MultiPolygon', coordinates: [square(127.1, 37.4, 127.2, 37.45).coordinates] }),
    ],
  };
  assert.deepEqual(map.bounds(fc), [126.9, 37.4, 127.2, 37.6]);
});

test('bounds of an empty map falls back to Seoul', () => {
  const [minLon, minLat, maxLon, maxLat] = map.bounds({ features: [] });
  assert.ok(minLon < 127 && maxLon > 127 && minLat < 37.5 && maxLat > 37.5);
});

test('the projection fits the box, puts north up and keeps proportions at the mid latitude', () => {
  const bbox = [126.8, 37.4, 127.2, 37.7];
  const p = map.projection(bbox, 1000);
  const close = (a, b) => assert.ok(Math.abs(a - b) < 1e-6, `${a} != ${b}`);
  const [x0, y0] = p.project([126.8, 37.7]); // north-west corner
  close(x0, 0);
  close(y0, 0);
  const [x1, y1] = p.project([127.2, 37.4]); // south-east corner
  close(x1, 1000);
  close(y1, p.height);
  // North is up: a higher latitude has a smaller y.
  assert.ok(p.project([127, 37.6])[1] < p.project([127, 37.5])[1]);
  // One kilometre east and one kilometre north are drawn the same length (to 1%).
  const kmLat = 1 / 111.32;
  const kmLon = kmLat / Math.cos((37.55 * Math.PI) / 180);
  const [cx, cy] = p.project([127, 37.55]);
  const east = p.project([127 + kmLon, 37.55])[0] - cx;
  const north = cy - p.project([127, 37.55 + kmLat])[1];
  assert.ok(Math.abs(east / north - 1) < 0.01, `east ${east} north ${north}`);
  // Seoul's box is wider than tall once longitude is shortened.
  assert.ok(p.height < 1000 && p.height > 800, `height ${p.height}`);
});

test('a degenerate box does not divide by zero', () => {
  const p = map.projection([127, 37.5, 127, 37.5], 1000);
  const [x, y] = p.project([127, 37.5]);
  assert.ok(Number.isFinite(x) && Number.isFinite(y));
});

test('simplify drops points closer than the tolerance and keeps the ring closed', () => {
  const ring = [[0, 0], [0.1, 0], [0.2, 0], [10, 0], [10, 10], [10.05, 10], [0, 10], [0, 0]];
  const s = map.simplify(ring, 1);
  assert.deepEqual(s, [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]);
  assert.deepEqual(s[0], s[s.length - 1]);
});

test('simplify never leaves fewer than 4 points, and a zero tolerance keeps all', () => {
  const tiny = [[0, 0], [0.01, 0], [0.01, 0.01], [0, 0.01], [0.005, 0], [0, 0]];
  assert.equal(map.simplify(tiny, 5).length, 4);
  assert.equal(map.simplify(tiny, 0).length, tiny.length);
});

test('pathData draws one closed subpath per ring, holes included', () => {
  const geometry = {
    type: 'Polygon',
    coordinates: [
      [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]],
      [[2, 2], [3, 2], [3, 3], [2, 3], [2, 2]],
    ],
  };
  const d = map.pathData(geometry, ([x, y]) => [x, y], 0);
  assert.equal(d, 'M0.0 0.0L10.0 0.0L10.0 10.0L0.0 10.0L0.0 0.0Z' + 'M2.0 2.0L3.0 2.0L3.0 3.0L2.0 3.0L2.0 2.0Z');
  assert.equal(map.pathData({ type: 'Point', coordinates: [1, 2] }, (p) => p, 0), '');
});

const lightness = (hex) => {
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};

test('the colour scale has its own fill for zero and darkens monotonically up to the maximum', () => {
  const scale = map.colourScale(40);
  assert.equal(scale(0), map.ZERO_FILL);
  assert.equal(scale(undefined), map.ZERO_FILL);
  assert.notEqual(map.ZERO_FILL, map.EMPTY_FILL, 'zero of a measure is not no activity');
  assert.notEqual(scale(1), map.ZERO_FILL);
  let last = Infinity;
  for (let v = 1; v <= 40; v++) {
    const l = lightness(scale(v));
    assert.ok(l <= last, `lightness rose at ${v}`);
    last = l;
  }
  assert.equal(scale(40), scale(1000), 'values above the maximum take the darkest colour');
  assert.equal(scale(40), '#bd0026');
  assert.match(scale(7), /^#[0-9a-f]{6}$/);
});

test('a scale whose maximum is zero still colours positive values', () => {
  const scale = map.colourScale(0);
  assert.equal(scale(0), map.ZERO_FILL);
  assert.equal(scale(1), '#bd0026');
});

test('legend stops are spaced in colour, and each is the colour its value is filled with', () => {
  const scale = map.colourScale(100);
  const stops = map.legendStops(100, 6, true);
  assert.deepEqual(stops.map(([v]) => v), [0, 4, 16, 36, 64, 100]);
  for (const [v, c] of stops) assert.equal(c, scale(v), `the swatch of ${v}`);
  // Evenly spaced in lightness, so the pale colours most districts have are in the legend.
  const l = stops.slice(1).map(([, c]) => lightness(c));
  const steps = l.slice(1).map((x, i) => l[i] - x);
  assert.ok(Math.max(...steps) < 2.5 * Math.min(...steps), `uneven steps ${steps}`);
  // Small counts: whole numbers, no repeats.
  assert.deepEqual(map.legendStops(3, 6, true).map(([v]) => v), [0, 1, 2, 3]);
  assert.deepEqual(map.legendStops(0, 6, true), [[0, map.ZERO_FILL]]);
});

test('plurals and short names read right', () => {
  assert.equal(map.plural(1, 'rider'), '1 rider');
  assert.equal(map.plural(2, 'rider'), '2 riders');
  assert.equal(map.plural(0, 'waiting delivery', 'waiting deliveries'), '0 waiting deliveries');
  assert.equal(map.shortName('서울특별시 강남구 역삼1동'), '역삼1동');
});

test('values and times are formatted for people', () => {
  assert.equal(map.formatValue('pressure', 1.234), '1.23');
  assert.equal(map.formatValue('riders_on_shift', 7), '7');
  assert.equal(map.formatValue('riders_on_shift', undefined), '0');
  assert.equal(map.formatAsOf(1764000005000), '2025-11-24 16:00:05.000 UTC');
  assert.equal(map.formatAsOf(undefined), '—');
});

test('maxOf, zeroDistrict and esc', () => {
  assert.equal(map.maxOf([{ a: 3 }, { a: 9 }, { a: 1 }], 'a'), 9);
  assert.equal(map.maxOf([], 'a'), 0);
  const z = map.zeroDistrict('1111051500', '청운효자동');
  for (const m of map.MEASURES) assert.equal(z[m.key], 0);
  assert.equal(z.name, '청운효자동');
  assert.equal(map.esc('<b a="1">&\''), '&lt;b a=&quot;1&quot;&gt;&amp;&#39;');
});

const whole = { x: 0, y: 0, w: 1000, h: 800 };

test('zooming keeps the point under the pointer in place and stays inside the map', () => {
  const z = map.zoomBox(whole, 0.5, 250, 200, whole);
  assert.deepEqual(z, { x: 125, y: 100, w: 500, h: 400 });
  // (250, 200) was at a quarter of the view and still is.
  assert.equal((250 - z.x) / z.w, 0.25);
  // Zooming out never shows more than the whole map.
  assert.deepEqual(map.zoomBox(z, 10, 500, 400, whole), whole);
  // Zooming in stops at 1/400 of the width.
  let v = whole;
  for (let i = 0; i < 50; i++) v = map.zoomBox(v, 0.5, 999, 799, whole);
  assert.equal(v.w, 2.5);
  assert.ok(v.x + v.w <= 1000 + 1e-9 && v.y + v.h <= 800 + 1e-9 && v.x >= 0 && v.y >= 0);
});

test('clampBox pulls a panned view back inside the map', () => {
  assert.deepEqual(map.clampBox({ x: -50, y: 700, w: 100, h: 200 }, whole), { x: 0, y: 600, w: 100, h: 200 });
});

test('fitBox frames the given boxes with a margin and the map aspect ratio', () => {
  const f = map.fitBox([{ x: 100, y: 100, w: 100, h: 50 }, { x: 300, y: 120, w: 10, h: 10 }], whole);
  assert.ok(Math.abs(f.h / f.w - 0.8) < 1e-9, 'aspect ratio');
  assert.ok(f.x <= 100 && f.x + f.w >= 310 && f.y <= 100 && f.y + f.h >= 150, 'covers both boxes');
  assert.ok(Math.abs(f.w - 231) < 1e-9, `width ${f.w}`);
  assert.deepEqual(map.fitBox([], whole), whole);
  assert.deepEqual(map.fitBox([{ x: -10, y: 0, w: 1100, h: 10 }], whole), whole);
});

test('parseEvent reads one Server-Sent Event and skips comments', () => {
  const e = map.parseEvent('event: changes\nid: 17\ndata: {"as_of":17,"districts":[],"removed":["x"]}');
  assert.deepEqual(e, { kind: 'changes', data: { as_of: 17, districts: [], removed: ['x'] } });
  assert.equal(map.parseEvent(': keep-alive'), null);
});

test('formatBehind says how far behind the input an answer is', () => {
  assert.equal(map.formatBehind(300), 'under 1 s behind');
  assert.equal(map.formatBehind(4_400), '4 s behind');
  assert.equal(map.formatBehind(600_000), '10 min behind');
});
