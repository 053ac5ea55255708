// The live map page: draws /v1/districts.geojson as SVG, fills each district by a chosen measure from
// the district feed (or /v1/districts, polled, without it), shows a district's counts on hover or
// tap, names districts where they fit, and finds a rider.
//
// The pure parts (projection, simplification, path strings, colour scale, formatting) are exported for
// node's test runner (map.test.js); the browser part starts only where there is a document.
'use strict';

/** The measures a district can be filled by: the fields of a district object (CONTRACT section 6). */
const MEASURES = [
  { key: 'riders_on_shift', label: 'Riders on shift' },
  { key: 'riders_delivering', label: 'Riders delivering' },
  { key: 'riders_idle', label: 'Idle riders' },
  { key: 'active_deliveries', label: 'Active deliveries' },
  { key: 'waiting_deliveries', label: 'Waiting deliveries' },
  { key: 'pressure', label: 'Pressure (waiting / idle)' },
];

/** Width of the SVG coordinate space; the height follows the map's aspect ratio. */
const VIEW_WIDTH = 1000;

/** [minLon, minLat, maxLon, maxLat] over every coordinate of a FeatureCollection. */
function bounds(collection) {
  let b = [Infinity, Infinity, -Infinity, -Infinity];
  for (const f of collection.features) {
    eachRing(f.geometry, (ring) => {
      for (const [lon, lat] of ring) {
        if (lon < b[0]) b[0] = lon;
        if (lat < b[1]) b[1] = lat;
        if (lon > b[2]) b[2] = lon;
        if (lat > b[3]) b[3] = lat;
      }
    });
  }
  if (!(b[0] <= b[2] && b[1] <= b[3])) b = [126.76, 37.41, 127.19, 37.72]; // no geometry: Seoul
  return b;
}

/** Calls `visit` on every ring of a Polygon or MultiPolygon geometry. */
function eachRing(geometry, visit) {
  if (!geometry) return;
  const polygons = geometry.type === 'Polygon' ? [geometry.coordinates]
    : geometry.type === 'MultiPolygon' ? geometry.coordinates : [];
  for (const polygon of polygons) for (const ring of polygon) visit(ring);
}

/**
 * An equirectangular projection fitted to `bbox` inside `width` (height from the aspect ratio), north up.
 * A degree of longitude is shortened by cos(mid latitude), so shapes keep their proportions at Seoul's
 * (or Korea's) scale, where the earth's curvature is negligible.
 */
function projection(bbox, width) {
  const [minLon, minLat, maxLon, maxLat] = bbox;
  const midLat = ((minLat + maxLat) / 2) * Math.PI / 180;
  const kx = Math.cos(midLat);
  const spanX = Math.max((maxLon - minLon) * kx, 1e-9);
  const spanY = Math.max(maxLat - minLat, 1e-9);
  const scale = width / spanX;
  const height = spanY * scale;
  return {
    width,
    height,
    project: ([lon, lat]) => [(lon - minLon) * kx * scale, (maxLat - lat) * scale],
  };
}

/**
 * Drops points closer than `tolerance` (in projected units) to the last kept one, keeping the first and
 * last, and never fewer than 4 points, so every ring stays a closed shape. A tolerance below a pixel
 * keeps the national map (3,504 districts, millions of points) quick to draw without visible change.
 */
function simplify(points, tolerance) {
  if (points.length <= 4 || tolerance <= 0) return points.slice();
  const kept = [points[0]];
  const t2 = tolerance * tolerance;
  for (let i = 1; i < points.length - 1; i++) {
    const [x, y] = points[i];
    const [lx, ly] = kept[kept.length - 1];
    if ((x - lx) * (x - lx) + (y - ly) * (y - ly) >= t2) kept.push(points[i]);
  }
  kept.push(points[points.length - 1]);
  if (kept.length < 4) return [points[0], points[1], points[2], points[points.length - 1]];
  return kept;
}

/** The SVG path data of a geometry: one closed subpath per ring, coordinates to 0.1 unit. */
function pathData(geometry, project, tolerance) {
  let d = '';
  eachRing(geometry, (ring) => {
    const points = simplify(ring.map(project), tolerance);
    if (points.length < 3) return;
    d += 'M' + points.map(([x, y]) => x.toFixed(1) + ' ' + y.toFixed(1)).join('L') + 'Z';
  });
  return d;
}

/**
 * The view box `box` ({x, y, w, h}) zoomed by `factor` (< 1 zooms in) around the point (cx, cy), which
 * stays where it is on screen. The result never shows more than `whole` nor less than 1/400 of its width,
 * and never leaves it.
 */
function zoomBox(box, factor, cx, cy, whole) {
  const w = Math.min(whole.w, Math.max(whole.w / 400, box.w * factor));
  const k = w / box.w;
  const h = box.h * k;
  return clampBox({ x: cx - (cx - box.x) * k, y: cy - (cy - box.y) * k, w, h }, whole);
}

/** `box` moved back inside `whole` (centred on it along an axis where it is larger). */
function clampBox(box, whole) {
  const fit = (start, size, wStart, wSize) => (size >= wSize ? wStart + (wSize - size) / 2
    : Math.min(Math.max(start, wStart), wStart + wSize - size));
  return { x: fit(box.x, box.w, whole.x, whole.w), y: fit(box.y, box.h, whole.y, whole.h), w: box.w, h: box.h };
}

/**
 * The smallest view box with the aspect ratio of `whole` that holds every box of `boxes` with a margin of
 * 5 %, inside `whole`; `whole` itself when there are none.
 */
function fitBox(boxes, whole) {
  if (boxes.length === 0) return { ...whole };
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const b of boxes) {
    x0 = Math.min(x0, b.x);
    y0 = Math.min(y0, b.y);
    x1 = Math.max(x1, b.x + b.w);
    y1 = Math.max(y1, b.y + b.h);
  }
  const aspect = whole.h / whole.w;
  let w = Math.max((x1 - x0) * 1.1, whole.w / 400);
  let h = (y1 - y0) * 1.1;
  if (h > w * aspect) w = h / aspect;
  else h = w * aspect;
  if (w > whole.w) return { ...whole };
  return clampBox({ x: (x0 + x1) / 2 - w / 2, y: (y0 + y1) / 2 - h / 2, w, h }, whole);
}

/** Fill of a district with no activity at all (or with no answer yet). */
const EMPTY_FILL = '#eef0f2';
/** A district with activity, but none of the chosen measure: not the same as no activity at all. */
const ZERO_FILL = '#fffdf3';
/** The sequential scale's two ends: pale yellow to deep red, readable on screens and in grey print. */
const LOW = [255, 237, 160];
const HIGH = [189, 0, 38];

/**
 * A colour scale for values in [0, max]: 0 is its own pale fill (a district with no activity at all is
 * EMPTY_FILL, chosen by the caller), anything above 0 runs from LOW to HIGH on a square-root curve
 * (counts are skewed: a few busy districts would flatten a linear scale).
 */
function colourScale(max) {
  const top = max > 0 ? max : 1;
  return (value) => {
    if (!(value > 0)) return ZERO_FILL;
    const t = Math.sqrt(Math.min(value, top) / top);
    return rgb(mix(LOW, HIGH, t));
  };
}

function mix(a, b, t) {
  return a.map((v, i) => Math.round(v + (b[i] - v) * t));
}

function rgb([r, g, b]) {
  return '#' + [r, g, b].map((v) => v.toString(16).padStart(2, '0')).join('');
}

/**
 * Legend stops for `max`: [value, colour] pairs, 0 first, then values spaced evenly in colour (not in
 * value: on the square-root scale even value steps would skip the pale colours most districts have).
 * Each colour is the one a district with that value is filled with; `integer` rounds the values (counts)
 * and drops repeats.
 */
function legendStops(max, count, integer = false) {
  const scale = colourScale(max);
  const stops = [[0, scale(0)]];
  for (let i = 1; i < count; i++) {
    const t = i / (count - 1);
    let value = max * t * t;
    if (integer) value = Math.max(1, Math.round(value));
    if (!(max > 0) || stops.some(([v]) => v === value)) continue;
    stops.push([value, scale(value)]);
  }
  return stops;
}

/** `n thing` or `n things`. */
function plural(n, one, many = one + 's') {
  return n + ' ' + (n === 1 ? one : many);
}

/** The short name of a district for its label: the last part of its full name (the dong). */
function shortName(name) {
  const parts = String(name).split(' ');
  return parts[parts.length - 1];
}

/** A measure's value for display: counts as integers, pressure with two decimals. */
function formatValue(key, value) {
  if (key === 'pressure') return (value || 0).toFixed(2);
  return String(value || 0);
}

/** `as_of` (ms since the epoch) as an ISO time with milliseconds, or a dash. */
function formatAsOf(asOf) {
  if (typeof asOf !== 'number' || !isFinite(asOf)) return '—';
  return new Date(asOf).toISOString().replace('T', ' ').replace('Z', ' UTC');
}

/** How far behind the input an answer is, from its `as_of` (the time it reflects) and now. */
function formatBehind(ms) {
  if (!isFinite(ms)) return '—';
  if (ms < 1000) return 'under 1 s behind';
  if (ms < 120000) return Math.round(ms / 1000) + ' s behind';
  return Math.round(ms / 60000) + ' min behind';
}

/** One Server-Sent Event block as `{kind, data}`; `null` for a comment or anything else. */
function parseEvent(block) {
  let kind = null;
  let data = '';
  for (const line of block.split('\n')) {
    if (line.startsWith('event: ')) kind = line.slice(7);
    else if (line.startsWith('data: ')) data += line.slice(6);
  }
  if (!kind || !data) return null;
  return { kind, data: JSON.parse(data) };
}

/** The largest value of `key` among the districts of an answer (0 when none). */
function maxOf(districts, key) {
  let max = 0;
  for (const d of districts) if (d[key] > max) max = d[key];
  return max;
}

/** A district with no activity: the zeros that /v1/districts leaves out. */
function zeroDistrict(code, name) {
  return {
    code, name, riders_on_shift: 0, riders_delivering: 0, riders_idle: 0,
    active_deliveries: 0, waiting_deliveries: 0, pressure: 0,
  };
}

// ---------------------------------------------------------------------------------------------------
// The browser part.

function start() {
  const $ = (id) => document.getElementById(id);
  const svgNS = 'http://www.w3.org/2000/svg';
  const state = {
    measure: MEASURES[0].key,
    names: new Map(), // code -> name
    paths: new Map(), // code -> <path>
    latest: null, // the last /v1/districts answer
    byCode: new Map(),
    selected: null, // code shown in the info panel
    highlighted: null, // code of the searched rider's district
    failingSince: null,
    proj: null,
    labels: new Map(), // code -> its <text> and the district's size in map units
  };
  window.dongflowMap = state; // for the browser test and for curious operators

  const select = $('measure');
  for (const m of MEASURES) {
    const option = document.createElement('option');
    option.value = m.key;
    option.textContent = m.label;
    select.appendChild(option);
  }
  select.addEventListener('change', () => {
    state.measure = select.value;
    paint();
  });

  // With --http-token-file every request needs a bearer token: the page asks for it once, on the
  // first 401, and keeps it for the tab (sessionStorage), so a reload does not ask again.
  const TOKEN_KEY = 'dongflow.token';
  let tokenAsked = null;

  function askToken(note) {
    if (tokenAsked) return tokenAsked;
    tokenAsked = new Promise((resolve) => {
      const form = $('token-form');
      $('token-note').textContent = note;
      form.hidden = false;
      $('token').focus();
      form.onsubmit = (e) => {
        e.preventDefault();
        const token = $('token').value.trim();
        if (!token) return;
        sessionStorage.setItem(TOKEN_KEY, token);
        form.hidden = true;
        tokenAsked = null;
        resolve();
      };
    });
    return tokenAsked;
  }

  /** fetch() of an API path with the tab's token, asking for one while the engine answers 401. */
  async function api(path) {
    for (;;) {
      const token = sessionStorage.getItem(TOKEN_KEY);
      const headers = token ? { Authorization: 'Bearer ' + token } : {};
      const r = await fetch(path, { cache: 'no-store', headers });
      if (r.status !== 401) return r;
      if (token) sessionStorage.removeItem(TOKEN_KEY);
      setStatus('waiting for an access token…', 'wait');
      await askToken(token ? 'That token was refused; try another.' : '');
    }
  }

  loadMap();
  $('search').addEventListener('submit', (e) => {
    e.preventDefault();
    findRider($('rider').value.trim());
  });

  async function loadMap() {
    setStatus('loading the district map…', 'wait');
    let collection;
    try {
      const r = await api('/v1/districts.geojson');
      collection = await r.json();
    } catch (e) {
      setStatus('The engine is unreachable: cannot load the district map. Retrying…', 'down');
      setTimeout(loadMap, 2000);
      return;
    }
    draw(collection);
    follow();
  }

  /**
   * Follows the district feed (`/v1/districts/changes`): a snapshot, then only what changed, as
   * the engine pushes it. While the feed cannot be had, the page polls `/v1/districts` every
   * second, and tries the feed again every 5 s.
   */
  async function follow() {
    state.source = 'feed';
    try {
      await readFeed();
    } catch (e) {
      // Fall through to polling.
    }
    state.source = 'poll';
    const poller = setInterval(refresh, 1000);
    refresh();
    setTimeout(() => {
      clearInterval(poller);
      follow();
    }, 5000);
  }

  /** Reads the feed until it ends or fails, applying every event. */
  async function readFeed() {
    const r = await api('/v1/districts/changes');
    if (!r.ok || !r.body) throw new Error('no feed: ' + r.status);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error('the feed ended');
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseEvent(block);
        if (event) applyEvent(event.kind, event.data);
      }
    }
  }

  /** One feed event: a snapshot replaces the districts, changes update and remove some. */
  function applyEvent(kind, body) {
    state.failingSince = null;
    if (kind === 'snapshot') {
      state.byCode = new Map(body.districts.map((d) => [d.code, d]));
    } else if (kind === 'changes') {
      for (const d of body.districts) state.byCode.set(d.code, d);
      for (const code of body.removed) state.byCode.delete(code);
    } else {
      return;
    }
    const districts = [...state.byCode.values()].sort((a, b) => (a.code < b.code ? -1 : 1));
    show({ as_of: body.as_of, stale: body.stale, districts });
  }

  function draw(collection) {
    const proj = projection(bounds(collection), VIEW_WIDTH);
    state.proj = proj;
    const svg = $('map');
    svg.setAttribute('viewBox', '0 0 ' + proj.width.toFixed(0) + ' ' + proj.height.toFixed(0));
    const group = document.createElementNS(svgNS, 'g');
    // A tenth of a unit of a 1000-unit-wide map: under a pixel on any screen, and still under two when
    // zoomed to Seoul on the national map; it drops most of the national map's points.
    const tolerance = 0.1;
    for (const f of collection.features) {
      const code = String(f.properties.code);
      const name = String(f.properties.name);
      const path = document.createElementNS(svgNS, 'path');
      path.setAttribute('d', pathData(f.geometry, proj.project, tolerance));
      path.setAttribute('class', 'district');
      path.setAttribute('fill', EMPTY_FILL);
      path.dataset.code = code;
      group.appendChild(path);
      state.names.set(code, name);
      state.paths.set(code, path);
    }
    svg.appendChild(group);
    // Names, shown where they fit at the current zoom (see showLabels).
    const labels = document.createElementNS(svgNS, 'g');
    labels.setAttribute('id', 'labels');
    for (const [code, path] of state.paths) {
      const b = path.getBBox();
      const text = document.createElementNS(svgNS, 'text');
      text.setAttribute('x', (b.x + b.width / 2).toFixed(1));
      text.setAttribute('y', (b.y + b.height / 2).toFixed(1));
      text.setAttribute('class', 'label');
      text.textContent = shortName(state.names.get(code));
      labels.appendChild(text);
      state.labels.set(code, { text, width: b.width, height: b.height, chars: text.textContent.length });
    }
    svg.appendChild(labels);
    state.whole = { x: 0, y: 0, w: proj.width, h: proj.height };
    state.view = { ...state.whole };
    enableZoom(svg);
    const marker = document.createElementNS(svgNS, 'circle');
    marker.setAttribute('id', 'rider-marker');
    marker.setAttribute('r', '6');
    marker.setAttribute('visibility', 'hidden');
    svg.appendChild(marker);
    // One listener for all districts: hover on a mouse, tap on a touch screen.
    svg.addEventListener('pointerover', (e) => {
      const code = e.target.dataset && e.target.dataset.code;
      if (code) selectDistrict(code);
    });
    svg.addEventListener('click', (e) => {
      const code = e.target.dataset && e.target.dataset.code;
      if (code) selectDistrict(code);
    });
    $('count').textContent = plural(collection.features.length, 'district');
    showLabels();
    window.addEventListener('resize', showLabels);
  }

  function setView(box) {
    state.view = box;
    $('map').setAttribute('viewBox', [box.x, box.y, box.w, box.h].map((v) => v.toFixed(2)).join(' '));
    showLabels();
  }

  /** Shows a district's name where it fits inside the district at the current zoom, at 11 px. */
  function showLabels() {
    const shown = $('map').getBoundingClientRect().width;
    if (!(shown > 0) || !state.view) return;
    const px = shown / state.view.w; // screen pixels per map unit
    const size = 11 / px;
    for (const { text, width, height, chars } of state.labels.values()) {
      // Hangul is about as wide as it is tall.
      const fits = width * px >= chars * 11 + 4 && height * px >= 14;
      text.setAttribute('visibility', fits ? 'visible' : 'hidden');
      if (fits) text.setAttribute('font-size', size.toFixed(3));
    }
  }

  /** Wheel zooms around the pointer, a drag pans, the buttons zoom, show all, or fit the activity. */
  function enableZoom(svg) {
    const toMap = (clientX, clientY) => {
      const m = svg.getScreenCTM().inverse();
      return [m.a * clientX + m.c * clientY + m.e, m.b * clientX + m.d * clientY + m.f];
    };
    svg.addEventListener('wheel', (e) => {
      e.preventDefault();
      const [cx, cy] = toMap(e.clientX, e.clientY);
      setView(zoomBox(state.view, e.deltaY > 0 ? 1.25 : 0.8, cx, cy, state.whole));
    }, { passive: false });
    let drag = null;
    svg.addEventListener('pointerdown', (e) => {
      if (e.pointerType === 'mouse' && e.button === 0) drag = { x: e.clientX, y: e.clientY, view: state.view, moved: false };
    });
    svg.addEventListener('pointermove', (e) => {
      if (!drag) return;
      const scale = drag.view.w / svg.getBoundingClientRect().width;
      const dx = (e.clientX - drag.x) * scale;
      const dy = (e.clientY - drag.y) * scale;
      if (Math.abs(e.clientX - drag.x) + Math.abs(e.clientY - drag.y) > 3) drag.moved = true;
      if (drag.moved) setView(clampBox({ ...drag.view, x: drag.view.x - dx, y: drag.view.y - dy }, state.whole));
    });
    window.addEventListener('pointerup', () => { drag = null; });
    const centre = () => [state.view.x + state.view.w / 2, state.view.y + state.view.h / 2];
    $('zoom-in').addEventListener('click', () => setView(zoomBox(state.view, 0.5, ...centre(), state.whole)));
    $('zoom-out').addEventListener('click', () => setView(zoomBox(state.view, 2, ...centre(), state.whole)));
    $('zoom-all').addEventListener('click', () => setView({ ...state.whole }));
    $('zoom-active').addEventListener('click', () => {
      const boxes = [];
      for (const [code, path] of state.paths) {
        const d = state.byCode.get(code);
        if (d && d[state.measure] > 0) {
          const b = path.getBBox();
          boxes.push({ x: b.x, y: b.y, w: b.width, h: b.height });
        }
      }
      setView(fitBox(boxes, state.whole));
    });
  }

  function selectDistrict(code) {
    if (state.selected === code) return;
    if (state.selected && state.paths.get(state.selected)) {
      state.paths.get(state.selected).classList.remove('selected');
    }
    state.selected = code;
    const path = state.paths.get(code);
    if (path) {
      path.classList.add('selected');
      path.parentNode.appendChild(path); // on top, so its outline shows whole
    }
    // On a phone the panel is a sheet over the bottom of the screen once a district is picked.
    $('district').classList.add('picked');
    showDistrict();
  }

  function showDistrict() {
    const code = state.selected;
    if (!code) return;
    const d = state.byCode.get(code) || zeroDistrict(code, state.names.get(code) || code);
    const rows = MEASURES.map((m) => '<tr><th>' + esc(m.label) + '</th><td data-key="' + m.key + '">' +
      formatValue(m.key, d[m.key]) + '</td></tr>').join('');
    $('district').innerHTML = '<h2>' + esc(d.name) + ' <small>' + esc(code) + '</small></h2><table>' + rows +
      '</table>';
  }

  async function refresh() {
    let r;
    let body;
    try {
      r = await api('/v1/districts');
      body = await r.json();
    } catch (e) {
      if (state.failingSince === null) state.failingSince = Date.now();
      setStatus('The engine is unreachable since ' + new Date(state.failingSince).toLocaleTimeString() +
        '; the map shows the last answer. Retrying every second.', 'down');
      return;
    }
    state.failingSince = null;
    if (!r.ok) {
      setStatus('The engine has no answer yet: ' + (body && body.error ? body.error : r.status), 'wait');
      return;
    }
    state.byCode = new Map(body.districts.map((d) => [d.code, d]));
    show(body);
  }

  /** Shows one state of the districts: colours, the selected district, totals, the status line. */
  function show(body) {
    state.latest = body;
    state.updates = (state.updates || 0) + 1;
    paint();
    showDistrict();
    const unassigned = state.byCode.get('unassigned');
    const totals = body.districts.reduce((t, d) => {
      t.on += d.riders_on_shift;
      t.delivering += d.riders_delivering;
      t.waiting += d.waiting_deliveries;
      return t;
    }, { on: 0, delivering: 0, waiting: 0 });
    $('totals').textContent = plural(totals.on, 'rider') + ' on shift, ' + totals.delivering + ' delivering, ' +
      plural(totals.waiting, 'waiting delivery', 'waiting deliveries') +
      (unassigned ? ' (' + plural(unassigned.riders_on_shift, 'rider') + ' outside every district)' : '');
    const how = state.source === 'feed' ? 'pushed' : 'polled every second';
    const behind = formatBehind(Date.now() - body.as_of);
    if (body.stale) {
      setStatus('as of ' + formatAsOf(body.as_of) + ' (' + behind + ') — STALE: answered from the ' +
        'changelog while the engine catches up; ' + how, 'stale');
    } else {
      setStatus('as of ' + formatAsOf(body.as_of) + ' (' + behind + ') — live, ' + how, 'live');
    }
  }

  function paint() {
    const key = state.measure;
    const districts = state.latest ? state.latest.districts : [];
    const max = maxOf(districts, key);
    const scale = colourScale(max);
    for (const [code, path] of state.paths) {
      const d = state.byCode.get(code);
      // No activity at all is told apart from none of this measure.
      const fill = d ? scale(d[key]) : EMPTY_FILL;
      // Only changed fills are written: the page repaints in place, without flicker.
      if (path.getAttribute('fill') !== fill) path.setAttribute('fill', fill);
    }
    drawLegend(key, max);
  }

  function drawLegend(key, max) {
    const stops = legendStops(max, 6, key !== 'pressure');
    const label = MEASURES.find((m) => m.key === key).label;
    const swatch = (colour, text) => '<span class="stop"><i style="background:' + colour + '"></i>' + text + '</span>';
    $('legend').innerHTML = '<span class="legend-title">' + esc(label) + '</span>' + swatch(EMPTY_FILL, 'no activity') +
      stops.map(([v, c]) => swatch(c, formatValue(key, v))).join('');
  }

  async function findRider(id) {
    const out = $('rider-result');
    if (!id) {
      out.textContent = 'Type a rider id, e.g. r-17.';
      return;
    }
    let r;
    let body;
    try {
      r = await api('/v1/riders/' + encodeURIComponent(id));
      body = await r.json();
    } catch (e) {
      out.textContent = 'The engine is unreachable.';
      return;
    }
    highlight(null);
    const marker = $('rider-marker');
    marker.setAttribute('visibility', 'hidden');
    if (!r.ok) {
      out.textContent = r.status === 404 ? 'No rider ' + id + ' is on shift.' : 'Error: ' + body.error;
      return;
    }
    const code = body.district.code;
    highlight(code);
    if (body.location && state.proj) {
      const [x, y] = state.proj.project([body.location.lon, body.location.lat]);
      marker.setAttribute('cx', x.toFixed(1));
      marker.setAttribute('cy', y.toFixed(1));
      marker.setAttribute('visibility', 'visible');
      marker.parentNode.appendChild(marker);
    }
    const deliveries = body.deliveries.length === 0 ? 'none'
      : body.deliveries.map((d) => esc(d.delivery_id) + ' (' + esc(d.status) + ')').join(', ');
    out.innerHTML = '<h2>' + esc(body.rider_id) + '</h2><table>' +
      '<tr><th>Status</th><td>' + esc(body.status) + '</td></tr>' +
      '<tr><th>Type</th><td>' + esc(body.rider_type || '—') + '</td></tr>' +
      '<tr><th>District</th><td data-code="' + esc(code) + '">' + esc(body.district.name) + ' <small>' +
      esc(code) + '</small></td></tr>' +
      '<tr><th>Location</th><td>' + (body.location ? body.location.lat.toFixed(5) + ', ' +
        body.location.lon.toFixed(5) : '—') + '</td></tr>' +
      '<tr><th>Active deliveries</th><td>' + deliveries + '</td></tr>' +
      '<tr><th>As of</th><td>' + esc(formatAsOf(body.as_of)) + (body.stale ? ' (stale)' : '') + '</td></tr>' +
      '</table>';
  }

  function highlight(code) {
    if (state.highlighted && state.paths.get(state.highlighted)) {
      state.paths.get(state.highlighted).classList.remove('highlight');
    }
    state.highlighted = code;
    const path = code && state.paths.get(code);
    if (path) {
      path.classList.add('highlight');
      path.parentNode.appendChild(path);
    }
  }

  function setStatus(text, kind) {
    const status = $('status');
    status.textContent = text;
    status.className = kind;
  }
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  }[c]));
}

if (typeof module === 'object' && module.exports) {
  module.exports = {
    MEASURES, EMPTY_FILL, ZERO_FILL, plural, shortName, bounds, projection, simplify, pathData, zoomBox, clampBox, fitBox, colourScale, legendStops, formatValue,
    formatAsOf, formatBehind, parseEvent, maxOf, zeroDistrict, esc,
  };
}
if (typeof document !== 'undefined') {
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
}
