// fleetgate live page: the reference client of the gateway, in plain JavaScript and a canvas.
//
// Owns, in this order: the model (trackers by id, source id → tracker id), the session (sign-in,
// tracker list, WebSocket subscription, reconnection with backoff), message handling (one
// function, `handleText`, for every frame from the socket and for the synthetic benchmark), and
// drawing (map and table), which happens once per animation frame at most, never per message.
// `window.fleetgate` exposes a read-only view of the model for tests and curious integrators.
(function () {
  'use strict';

  // --- constants ------------------------------------------------------------------------------

  const TRACK_POINTS = 32; // positions kept per tracker for its track
  const ROW_H = 26; // table row height in px (keep in step with --row-h in app.css)
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const SUBSCRIBE_CHUNK = 1000; // tracker ids per subscribe message (frame size limit)
  const STATS_WINDOW_MS = 5000;
  const MIN_SPAN = 0.00004; // smallest fitted span in world units (~1.6 km at the equator)
  const HASH_KEY = 'fleetgate.hash';
  const LOGIN_KEY = 'fleetgate.login';
  const ENDED_TEXT = 'Session ended \u2014 sign in again';
  const COLORS = {
    moving: '#3ccf6a',
    stopped: '#f2b233',
    parked: '#5b8def',
    none: '#a9b4c2',
    blocked: '#6b7480',
  };
  const GROUPS = ['moving', 'stopped', 'parked', 'none', 'blocked'];

  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);

  // --- model ----------------------------------------------------------------------------------

  /** Tracker id → tracker. Placeholders for sources not (yet) in the tracker list use -source_id. */
  const trackers = new Map();
  /** Source id → tracker id: batch items and lifecycle events name the source. */
  const bySource = new Map();

  function newTracker(id, label, sourceId) {
    return {
      id,
      label,
      sourceId,
      search: '',
      status: null, // normal | blocked | unknown | disallowed (from the subscribe response)
      conn: null, // connection_status
      move: null, // movement_status
      speed: null,
      heading: 0,
      lat: NaN,
      lng: NaN,
      wx: NaN, // Web Mercator world coordinates in [0, 1]
      wy: NaN,
      last: null, // last_update, as sent (already in the user's time zone)
      updates: 0,
      track: new Float64Array(TRACK_POINTS * 2),
      trackLen: 0,
      trackHead: 0,
      version: 1, // bumped on every change the table shows
      sx: NaN, // where the marker was last drawn, CSS px in the canvas
      sy: NaN,
      drawnGroup: null,
    };
  }

  function setLabel(t, label) {
    t.label = label;
    t.search = (label + ' ' + t.id + ' ' + (t.sourceId == null ? '' : t.sourceId)).toLowerCase();
  }

  function pushTrack(t) {
    const i = t.trackHead * 2;
    t.track[i] = t.wx;
    t.track[i + 1] = t.wy;
    t.trackHead = (t.trackHead + 1) % TRACK_POINTS;
    if (t.trackLen < TRACK_POINTS) t.trackLen++;
  }

  function removeTracker(id) {
    const t = trackers.get(id);
    if (!t) return;
    trackers.delete(id);
    if (t.sourceId != null && bySource.get(t.sourceId) === id) bySource.delete(t.sourceId);
    if (ui.selected === id) ui.selected = null;
    dirty.order = dirty.map = dirty.table = true;
  }

  /** Merges `GET /v2/tracker/list`'s list into the model; trackers no longer listed go away. */
  function applyTrackerList(list) {
    const seen = new Set();
    for (const item of list) {
      if (!item || typeof item !== 'object') continue;
      const id = Number(item.id);
      if (!Number.isSafeInteger(id)) continue;
      const src = item.source && Number.isSafeInteger(item.source.id) ? item.source.id : null;
      let t = trackers.get(id);
      if (!t && src != null && trackers.has(-src)) {
        // A placeholder made from a batch item before the list knew this source.
        t = trackers.get(-src);
        trackers.delete(-src);
        t.id = id;
        trackers.set(id, t);
      }
      if (!t) {
        t = newTracker(id, '', src);
        trackers.set(id, t);
      }
      t.sourceId = src;
      if (src != null) bySource.set(src, id);
      setLabel(t, typeof item.label === 'string' && item.label ? item.label : '#' + id);
      if (item.source && item.source.blocked === true) t.status = 'blocked';
      else if (item.source && item.source.blocked === false && t.status === 'blocked') t.status = 'normal';
      t.version++;
      seen.add(id);
    }
    for (const id of [...trackers.keys()]) if (!seen.has(id)) removeTracker(id);
    dirty.order = dirty.map = dirty.table = true;
    invalidate();
  }

  /** `{"<tracker id>": "normal" | "blocked" | "unknown" | "disallowed", …}` */
  function applyStatuses(value) {
    if (!value || typeof value !== 'object' || Array.isArray(value)) return;
    for (const key of Object.keys(value)) {
      const t = trackers.get(Number(key));
      const v = value[key];
      if (t && typeof v === 'string') {
        t.status = v;
        t.version++;
      }
    }
    dirty.map = dirty.table = true;
    invalidate();
  }

  /** One source state (full or compact) for tracker `trackerId` (or found by its source id). */
  function applyState(trackerId, s) {
    if (!s || typeof s !== 'object') return;
    let id = Number.isSafeInteger(trackerId) ? trackerId : bySource.get(s.source_id);
    let t = id === undefined ? undefined : trackers.get(id);
    if (!t) {
      // state_batch with target "all" may name a source the list did not have (added since).
      if (!Number.isSafeInteger(s.source_id)) return;
      id = -s.source_id;
      t = trackers.get(id);
      if (!t) {
        t = newTracker(id, '', s.source_id);
        setLabel(t, 'source ' + s.source_id);
        trackers.set(id, t);
        bySource.set(s.source_id, id);
        dirty.order = true;
        session.refreshList();
      }
    }
    const gps = s.gps;
    if (gps && typeof gps === 'object') {
      const loc = gps.location;
      if (loc && Number.isFinite(loc.lat) && Number.isFinite(loc.lng)) {
        if (loc.lat !== t.lat || loc.lng !== t.lng || t.trackLen === 0) {
          t.lat = loc.lat;
          t.lng = loc.lng;
          t.wx = lngToX(loc.lng);
          t.wy = latToY(loc.lat);
          pushTrack(t);
        }
      }
      if (Number.isFinite(gps.heading)) t.heading = gps.heading;
      if (Number.isFinite(gps.speed)) t.speed = gps.speed;
    }
    if (typeof s.connection_status === 'string') t.conn = s.connection_status;
    if (typeof s.movement_status === 'string') t.move = s.movement_status;
    if (s.last_update != null) t.last = String(s.last_update);
    if (t.status == null) t.status = 'normal';
    t.updates++;
    t.version++;
    stats.applied++;
    dirty.map = dirty.table = true;
  }

  function applyLifecycle(msg) {
    const d = msg.data;
    if (!d || typeof d !== 'object') return;
    const id = Number.isSafeInteger(msg.tracker_id) ? msg.tracker_id : bySource.get(d.source_id);
    const t = id === undefined ? undefined : trackers.get(id);
    if (!t) return;
    switch (d.lifecycle_event) {
      case 'block':
        t.status = 'blocked';
        break;
      case 'unblock':
        t.status = 'normal'; // the current state follows at once
        break;
      default:
        // 'corrupt' (removed, or moved to another account), 'disallowed' (a sub-user's grant
        // revoked; a fleetgate extension), and any value this page does not know: the tracker
        // is no longer ours to show.
        removeTracker(t.id);
        break;
    }
    t.version++;
    dirty.map = dirty.table = true;
  }

  // --- messages -------------------------------------------------------------------------------

  /** Every frame from the gateway goes through here, and so does the benchmark's traffic. */
  function handleText(text) {
    const t0 = performance.now();
    stats.messages++;
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (_) {
      return; // not JSON (e.g. an Atmosphere heartbeat): nothing to do
    }
    if (!msg || typeof msg !== 'object') return;
    if (msg.type === 'event') {
      if (typeof msg.user_time === 'string') session.userTime = msg.user_time;
      switch (msg.event) {
        case 'state':
          applyState(msg.tracker_id, msg.data);
          break;
        case 'state_batch':
          if (Array.isArray(msg.data)) {
            for (const item of msg.data) {
              if (!item || typeof item !== 'object') continue;
              // The live service wraps items ({"type":"source_state_event","state":{…}});
              // Navixy's page shows bare states. Accept both.
              applyState(item.tracker_id, item.state && typeof item.state === 'object' ? item.state : item);
            }
          }
          break;
        case 'lifecycle':
          applyLifecycle(msg);
          break;
        case 'logout':
          session.ended(ENDED_TEXT);
          break;
        default:
          break;
      }
    } else if (msg.type === 'response') {
      session.onResponse(msg);
    } else if (msg.type === 'error') {
      session.onError(msg);
    }
    stats.handleMs += performance.now() - t0;
    invalidate();
  }

  // --- session: sign-in, tracker list, subscription, reconnection -----------------------------

  const session = {
    hash: null,
    login: null,
    ws: null,
    gen: 0, // bumped per connection attempt; callbacks of older ones are ignored
    phase: 'idle', // idle | list | socket | batch? | state? | live | ended | bench
    mode: null, // state_batch | state | bench
    pendingState: 0,
    listKnown: true,
    everLive: false,
    backoff: BACKOFF_MIN_MS,
    attempts: 0,
    retryTimer: 0,
    retryAt: 0,
    refreshTimer: 0,
    userTime: null,
    lastError: null,

    start(hash, login) {
      this.stop();
      this.hash = hash;
      this.login = login || null;
      this.everLive = false;
      this.backoff = BACKOFF_MIN_MS;
      this.attempts = 0;
      view.fitted = view.userMoved = false; // fit to this session's fleet
      try {
        sessionStorage.setItem(HASH_KEY, hash);
        if (login) sessionStorage.setItem(LOGIN_KEY, login);
        else sessionStorage.removeItem(LOGIN_KEY);
      } catch (_) {
        /* storage may be disabled; the page works without it */
      }
      ui.hideSignIn();
      ui.hideBanner();
      ui.who(login ? 'signed in as ' + login : 'session ' + hash.slice(0, 6) + '\u2026');
      $('signout').hidden = false;
      this.connect();
    },

    /** Drops the socket and timers without touching the stored hash. */
    stop() {
      this.gen++;
      clearTimeout(this.retryTimer);
      clearTimeout(this.refreshTimer);
      this.retryTimer = this.refreshTimer = 0;
      if (this.ws) {
        const ws = this.ws;
        this.ws = null;
        try {
          ws.close(1000, 'bye');
        } catch (_) {
          /* already closed */
        }
      }
    },

    forget() {
      this.hash = null;
      try {
        sessionStorage.removeItem(HASH_KEY);
        sessionStorage.removeItem(LOGIN_KEY);
      } catch (_) {
        /* ignore */
      }
    },

    async connect() {
      const gen = ++this.gen;
      this.attempts++;
      this.phase = 'list';
      ui.conn('connecting', this.attempts > 1 ? 'reconnecting\u2026' : 'loading trackers\u2026');
      const res = await loadTrackers(this.hash);
      if (gen !== this.gen) return;
      if (res.error) {
        const code = res.error.code;
        if (code === 3 || code === 4) this.ended(ENDED_TEXT);
        else this.fail('tracker/list: ' + (res.error.description || 'error ' + code));
        return;
      }
      if (res.retry) {
        this.retry(res.why || 'gateway unreachable');
        return;
      }
      this.listKnown = res.list !== null;
      if (res.list) applyTrackerList(res.list);
      this.phase = 'socket';
      ui.conn('connecting', 'connecting\u2026');
      let ws;
      try {
        ws = new WebSocket(wsUrl());
      } catch (e) {
        this.retry('cannot open the socket');
        return;
      }
      this.ws = ws;
      ws.onopen = () => {
        if (gen === this.gen) this.subscribe();
      };
      ws.onmessage = (ev) => {
        if (gen === this.gen && typeof ev.data === 'string') handleText(ev.data);
      };
      ws.onclose = (ev) => {
        if (gen !== this.gen) return;
        this.ws = null;
        if (this.phase === 'ended' || !this.hash) return;
        this.retry('connection closed' + (ev.code ? ' (' + ev.code + ')' : ''));
      };
    },

    send(obj) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(obj));
    },

    /**
     * First choice: one `state_batch` over every tracker; `state` if the gateway says no (or
     * when the page was opened with `?subscribe=state`).
     */
    subscribe() {
      if (params.get('subscribe') === 'state') {
        this.subscribeState();
        return;
      }
      this.phase = 'batch?';
      ui.conn('connecting', 'subscribing\u2026');
      this.send({
        action: 'subscribe',
        hash: this.hash,
        requests: [{ type: 'state_batch', target: { type: 'all' }, rate_limit: '1s', format: 'compact' }],
      });
    },

    subscribeState() {
      this.mode = 'state';
      const ids = [...trackers.keys()].filter((id) => id > 0);
      if (ids.length === 0) {
        if (this.listKnown) this.live();
        else this.fail('this gateway has neither tracker/list nor state_batch: cannot find your trackers');
        return;
      }
      this.phase = 'state?';
      this.pendingState = Math.ceil(ids.length / SUBSCRIBE_CHUNK);
      for (let i = 0; i < ids.length; i += SUBSCRIBE_CHUNK) {
        this.send({
          action: 'subscribe',
          hash: this.hash,
          requests: [{ type: 'state', trackers: ids.slice(i, i + SUBSCRIBE_CHUNK), format: 'full' }],
        });
      }
    },

    onResponse(msg) {
      if (msg.action !== 'subscription/subscribe') return;
      const data = msg.data && typeof msg.data === 'object' ? msg.data : {};
      if (this.phase === 'batch?' && 'state_batch' in data) {
        const r = data.state_batch;
        if (r && r.success === true) {
          this.mode = 'state_batch';
          applyStatuses(r.value);
          this.live();
        } else {
          this.subscribeState();
        }
        return;
      }
      if ('state' in data) {
        const r = data.state;
        // Requests form: {"success": true, "value": {…}}; legacy form: the map itself.
        const value = r && typeof r === 'object' && 'success' in r ? (r.success ? r.value : null) : r;
        applyStatuses(value);
        this.chunkDone();
      }
    },

    chunkDone() {
      if (this.phase === 'state?' && --this.pendingState <= 0) this.live();
    },

    onError(msg) {
      const status = msg.status && typeof msg.status === 'object' ? msg.status : {};
      const code = status.code;
      if (code === 3 || code === 4) {
        this.ended(ENDED_TEXT);
        return;
      }
      if (msg.action === 'subscription/subscribe') {
        if (this.phase === 'batch?') {
          // Code 7: this gateway does not know state_batch (yet). Anything else: try state too.
          this.subscribeState();
          return;
        }
        if (code === 14 || code === 6) {
          // Database unavailable: drop the socket and subscribe again after a pause.
          this.stop();
          this.retry(status.description || 'gateway busy');
          return;
        }
        if (this.phase === 'state?') this.chunkDone();
      }
      this.lastError = (status.description || 'error') + (code != null ? ' (code ' + code + ')' : '');
      ui.foot();
    },

    live() {
      this.phase = 'live';
      this.everLive = true;
      this.backoff = BACKOFF_MIN_MS;
      this.attempts = 0;
      ui.conn('live', this.mode === 'state_batch' ? 'live \u00b7 state_batch, all trackers, 1 s' : 'live \u00b7 state');
      ui.hideBanner();
    },

    retry(why) {
      if (this.phase === 'ended' || !this.hash) return;
      this.phase = 'retry';
      const delay = Math.min(BACKOFF_MAX_MS, this.backoff) * (0.8 + Math.random() * 0.4);
      this.backoff = Math.min(BACKOFF_MAX_MS, this.backoff * 2);
      this.retryAt = performance.now() + delay;
      clearTimeout(this.retryTimer);
      this.retryTimer = setTimeout(() => this.connect(), delay);
      this.lastError = why;
      ui.reconnectCountdown();
    },

    /** logout, or a hash the gateway no longer knows: stop, and ask to sign in again. */
    ended(text) {
      const wasLive = this.everLive;
      this.stop();
      this.phase = 'ended';
      this.forget();
      $('signout').hidden = true;
      ui.conn('ended', 'session ended');
      if (wasLive) ui.showBanner(text);
      else ui.showSignIn('Unknown or ended session: sign in again.');
      dirty.map = true;
      invalidate();
    },

    fail(text) {
      this.stop();
      this.phase = 'error';
      this.lastError = text;
      ui.conn('error', text);
    },

    /** A batch named a source we do not know: fetch the list again, at most every 2 s. */
    refreshList() {
      if (this.refreshTimer || this.phase === 'bench' || !this.hash) return;
      const gen = this.gen;
      this.refreshTimer = setTimeout(async () => {
        const res = await loadTrackers(this.hash);
        this.refreshTimer = 0;
        if (gen === this.gen && res.list) applyTrackerList(res.list);
      }, 2000);
    },

    signOut() {
      this.stop();
      this.forget();
      this.phase = 'idle';
      this.everLive = false;
      for (const id of [...trackers.keys()]) removeTracker(id);
      $('signout').hidden = true;
      ui.who('');
      ui.conn('signed-out', 'not signed in');
      ui.hideBanner();
      ui.showSignIn('');
      invalidate();
    },
  };

  function wsUrl() {
    return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/v2/event/subscription';
  }

  /** fetch + JSON, never throwing: {http, body} with body null when the answer was not JSON. */
  async function fetchJson(url, init) {
    let res;
    try {
      res = await fetch(url, Object.assign({ cache: 'no-store' }, init || {}));
    } catch (_) {
      return { http: 0, body: null };
    }
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      body = null;
    }
    return { http: res.status, body };
  }

  /** {list} | {list: null} (no such endpoint) | {error: status} | {retry: true}. */
  async function loadTrackers(hash) {
    const r = await fetchJson('/v2/tracker/list?hash=' + encodeURIComponent(hash));
    const b = r.body;
    if (b && b.success === true && Array.isArray(b.list)) return { list: b.list };
    if (b && b.success === false) return { error: b.status && typeof b.status === 'object' ? b.status : {} };
    if (r.http === 404 || r.http === 405) return { list: null };
    return { retry: true, why: r.http ? 'tracker/list answered ' + r.http : 'gateway unreachable' };
  }

  async function signInWithPassword(login, password) {
    ui.signInError('');
    $('login-submit').disabled = true;
    const r = await fetchJson('/v2/user/auth', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ login, password }),
    });
    $('login-submit').disabled = false;
    const b = r.body;
    if (b && b.success === true && typeof b.hash === 'string' && b.hash.length === 32) {
      session.start(b.hash, login);
    } else if (b && b.success === false) {
      const s = b.status || {};
      ui.signInError(s.description || 'Wrong login or password' + (s.code != null ? ' (code ' + s.code + ')' : ''));
    } else if (r.http === 404 || r.http === 405) {
      ui.signInError('This gateway has no user/auth: paste a session hash instead.');
    } else {
      ui.signInError(r.http ? 'Sign-in failed (HTTP ' + r.http + ').' : 'The gateway does not answer.');
    }
  }

  // --- projection and view --------------------------------------------------------------------

  const lngToX = (lng) => (lng + 180) / 360;
  const xToLng = (x) => x * 360 - 180;
  function latToY(lat) {
    const s = Math.sin((Math.max(-85.05113, Math.min(85.05113, lat)) * Math.PI) / 180);
    return 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI);
  }
  const yToLat = (y) => (Math.atan(Math.sinh(Math.PI * (1 - 2 * y))) * 180) / Math.PI;

  const view = { cx: lngToX(13.4), cy: latToY(52.5), zoom: 3, userMoved: false, fitted: false, lastFit: 0 };
  const canvas = $('map');
  const ctx = canvas.getContext('2d', { alpha: false });
  const bg = document.createElement('canvas');
  const bgCtx = bg.getContext('2d', { alpha: false });
  let cw = 0;
  let ch = 0;
  let dpr = 1;
  let tileUrl = '';

  const scale = () => 256 * Math.pow(2, view.zoom);

  function resize() {
    const r = canvas.getBoundingClientRect();
    dpr = window.devicePixelRatio || 1;
    cw = Math.max(1, r.width);
    ch = Math.max(1, r.height);
    canvas.width = bg.width = Math.round(cw * dpr);
    canvas.height = bg.height = Math.round(ch * dpr);
    dirty.bg = dirty.map = true;
    invalidate();
  }

  function fleetBounds() {
    let minX = Infinity;
    let minY = Infinity;
    let maxX = -Infinity;
    let maxY = -Infinity;
    for (const t of trackers.values()) {
      if (!(t.wx === t.wx)) continue; // NaN: no position yet
      if (t.wx < minX) minX = t.wx;
      if (t.wx > maxX) maxX = t.wx;
      if (t.wy < minY) minY = t.wy;
      if (t.wy > maxY) maxY = t.wy;
    }
    return minX <= maxX ? { minX, minY, maxX, maxY } : null;
  }

  function fit() {
    const b = fleetBounds();
    if (!b) return false;
    const sx = Math.max(b.maxX - b.minX, MIN_SPAN);
    const sy = Math.max(b.maxY - b.minY, MIN_SPAN);
    const z = Math.log2(Math.min((cw * 0.75) / (sx * 256), (ch * 0.7) / (sy * 256)));
    view.zoom = Math.max(1, Math.min(18, z));
    view.cx = (b.minX + b.maxX) / 2;
    view.cy = (b.minY + b.maxY) / 2 + (16 / scale()); // a little room for the legend below
    view.fitted = true;
    view.lastFit = performance.now();
    dirty.bg = dirty.map = true;
    return true;
  }

  function zoomAt(mx, my, dz) {
    const S = scale();
    const wx = view.cx + (mx - cw / 2) / S;
    const wy = view.cy + (my - ch / 2) / S;
    view.zoom = Math.max(1, Math.min(21, view.zoom + dz));
    const S2 = scale();
    view.cx = wx - (mx - cw / 2) / S2;
    view.cy = wy - (my - ch / 2) / S2;
    view.userMoved = true;
    dirty.bg = dirty.map = true;
    invalidate();
  }

  // --- drawing: background (tiles, graticule, scale bar), redrawn only when the view changes --

  const tiles = new Map(); // "z/x/y" → {img, ok}
  let tilesLoaded = 0;

  function drawTiles(g, S) {
    const z = Math.max(0, Math.min(19, Math.round(view.zoom)));
    const n = Math.pow(2, z);
    const px = S / n;
    const x0w = view.cx - cw / 2 / S;
    const y0w = view.cy - ch / 2 / S;
    const tx0 = Math.floor(x0w * n);
    const tx1 = Math.floor((x0w + cw / S) * n);
    const ty0 = Math.max(0, Math.floor(y0w * n));
    const ty1 = Math.min(n - 1, Math.floor((y0w + ch / S) * n));
    if ((tx1 - tx0 + 1) * (ty1 - ty0 + 1) > 400) return;
    for (let ty = ty0; ty <= ty1; ty++) {
      for (let tx = tx0; tx <= tx1; tx++) {
        const wx = ((tx % n) + n) % n;
        const key = z + '/' + wx + '/' + ty;
        let e = tiles.get(key);
        if (!e) {
          e = { img: new Image(), ok: false };
          e.img.onload = () => {
            e.ok = true;
            tilesLoaded++;
            dirty.bg = dirty.map = true;
            invalidate();
          };
          e.img.src = tileUrl
            .replace('{z}', z)
            .replace('{x}', wx)
            .replace('{y}', ty)
            .replace('{s}', 'abc'[(wx + ty) % 3]);
          tiles.set(key, e);
          if (tiles.size > 600) tiles.delete(tiles.keys().next().value);
        }
        if (e.ok) g.drawImage(e.img, (tx / n - x0w) * S, (ty / n - y0w) * S, px + 0.5, px + 0.5);
      }
    }
    g.fillStyle = 'rgba(11, 18, 27, 0.35)'; // dim the tiles so that markers stand out
    g.fillRect(0, 0, cw, ch);
  }

  const STEPS = [45, 30, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001];

  function pickStep(spanDeg, px) {
    const want = (spanDeg / Math.max(1, px)) * 110; // about 110 px between lines
    let step = STEPS[0];
    for (const s of STEPS) if (s >= want) step = s;
    return step;
  }

  function fmtDeg(v, step, pos, neg) {
    const d = Math.max(0, Math.ceil(-Math.log10(step) - 1e-9));
    const a = Math.abs(v);
    if (a < step / 2) return '0\u00b0';
    return a.toFixed(d) + '\u00b0' + (v > 0 ? pos : neg);
  }

  function drawBackground() {
    const g = bgCtx;
    const S = scale();
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.fillStyle = '#0b121b';
    g.fillRect(0, 0, cw, ch);
    const x0w = view.cx - cw / 2 / S;
    const y0w = view.cy - ch / 2 / S;
    const toSx = (wx) => (wx - x0w) * S;
    const toSy = (wy) => (wy - y0w) * S;
    // Outside the Mercator world: darker.
    const top = toSy(0);
    const bottom = toSy(1);
    g.fillStyle = '#111b27';
    g.fillRect(0, Math.max(0, top), cw, Math.min(ch, bottom) - Math.max(0, top));
    if (tileUrl) drawTiles(g, S);

    const lng0 = xToLng(x0w);
    const lng1 = xToLng(x0w + cw / S);
    const latTop = yToLat(Math.max(0, y0w));
    const latBottom = yToLat(Math.min(1, y0w + ch / S));
    const lngStep = pickStep(lng1 - lng0, cw);
    const latStep = pickStep(Math.max(1e-9, latTop - latBottom), ch);
    g.lineWidth = 1;
    g.strokeStyle = tileUrl ? 'rgba(255, 255, 255, 0.28)' : 'rgba(138, 155, 176, 0.22)';
    g.beginPath();
    const lngs = [];
    for (let v = Math.ceil(lng0 / lngStep) * lngStep; v <= lng1; v += lngStep) {
      const x = Math.round(toSx(lngToX(v))) + 0.5;
      g.moveTo(x, Math.max(0, top));
      g.lineTo(x, Math.min(ch, bottom));
      lngs.push([v, x]);
    }
    const lats = [];
    for (let v = Math.ceil(latBottom / latStep) * latStep; v <= latTop; v += latStep) {
      const y = Math.round(toSy(latToY(v))) + 0.5;
      g.moveTo(0, y);
      g.lineTo(cw, y);
      lats.push([v, y]);
    }
    g.stroke();
    g.font = '11px system-ui, "DejaVu Sans", sans-serif';
    g.fillStyle = tileUrl ? 'rgba(255, 255, 255, 0.85)' : 'rgba(160, 176, 196, 0.75)';
    g.textBaseline = 'top';
    for (const [v, x] of lngs) g.fillText(fmtDeg(v, lngStep, 'E', 'W'), x + 4, 4);
    g.textBaseline = 'bottom';
    for (const [v, y] of lats) if (y > 20) g.fillText(fmtDeg(v, latStep, 'N', 'S'), 4, y - 2);

    // Scale bar, bottom right above the footer.
    const lat = yToLat(view.cy);
    const mPerPx = (40075016.686 * Math.cos((lat * Math.PI) / 180)) / S;
    const maxM = mPerPx * 120;
    const p = Math.pow(10, Math.floor(Math.log10(maxM)));
    const len = [5, 2, 1].map((k) => k * p).find((m) => m <= maxM) || p;
    const w = len / mPerPx;
    const bx = cw - 14 - w;
    const by = ch - 50;
    g.strokeStyle = 'rgba(219, 228, 238, 0.7)';
    g.beginPath();
    g.moveTo(bx, by - 4);
    g.lineTo(bx, by);
    g.lineTo(bx + w, by);
    g.lineTo(bx + w, by - 4);
    g.stroke();
    g.fillStyle = 'rgba(219, 228, 238, 0.8)';
    g.textBaseline = 'bottom';
    g.textAlign = 'center';
    g.fillText(len >= 1000 ? len / 1000 + ' km' : len + ' m', bx + w / 2, by - 3);
    g.textAlign = 'start';
  }

  // --- drawing: tracks and markers, every frame that has changes ------------------------------

  const groupPaths = { moving: [], stopped: [], parked: [], none: [], blocked: [] };
  const HEADING_STEP = 5; // degrees between pre-drawn arrow headings
  const HEADINGS = 360 / HEADING_STEP;
  const sprites = { canvas: null, px: null, atlasWidth: 0, r: 0, dpr: 0, cell: 0 };

  const PIXEL_BLIT_MIN = 1500; // visible markers from which they are blitted by hand
  const layer = { canvas: document.createElement('canvas'), ctx: null, img: null, px: null };

  const headingIndex = (h) => Math.round((((h % 360) + 360) % 360) / HEADING_STEP) % HEADINGS;

  /** Copies every visible marker's sprite pixels into one ImageData, then draws it once. */
  function blitMarkers() {
    const W = canvas.width;
    const H = canvas.height;
    if (!layer.img || layer.img.width !== W || layer.img.height !== H) {
      layer.canvas.width = W;
      layer.canvas.height = H;
      layer.ctx = layer.canvas.getContext('2d');
      layer.img = layer.ctx.createImageData(W, H);
      layer.px = new Uint32Array(layer.img.data.buffer);
    }
    const px = layer.px;
    px.fill(0);
    const sp = sprites.px;
    const aw = sprites.atlasWidth;
    const cell = sprites.cell;
    const half = cell / 2;
    for (let gi = 0; gi < GROUPS.length; gi++) {
      const list = groupPaths[GROUPS[gi]];
      const sy = gi * cell;
      for (let k = 0; k < list.length; k++) {
        const t = list[k];
        const x0 = Math.round(t.sx * dpr - half);
        const y0 = Math.round(t.sy * dpr - half);
        const sx = headingIndex(t.heading) * cell;
        const xa = Math.max(0, -x0);
        const xb = Math.min(cell, W - x0);
        const ya = Math.max(0, -y0);
        const yb = Math.min(cell, H - y0);
        for (let y = ya; y < yb; y++) {
          const srow = (sy + y) * aw + sx;
          const drow = (y0 + y) * W + x0;
          for (let x = xa; x < xb; x++) {
            const p = sp[srow + x];
            const a = p >>> 24;
            // Solid pixels win; soft edges only land on empty pixels (no blending needed).
            if (a >= 128 || (a !== 0 && px[drow + x] === 0)) px[drow + x] = p;
          }
        }
      }
    }
    layer.ctx.putImageData(layer.img, 0, 0);
    ctx.drawImage(layer.canvas, 0, 0);
  }

  /** Draws every arrow once: a row per colour group, a column per heading, device pixels. */
  function ensureSprites(r) {
    if (sprites.canvas && sprites.r === r && sprites.dpr === dpr) return;
    const cell = Math.ceil((2 * r + 4) * dpr);
    const c = document.createElement('canvas');
    c.width = cell * HEADINGS;
    c.height = cell * GROUPS.length;
    const g = c.getContext('2d', { willReadFrequently: true });
    g.lineJoin = 'round';
    for (let gi = 0; gi < GROUPS.length; gi++) {
      for (let hi = 0; hi < HEADINGS; hi++) {
        const a = (hi * HEADING_STEP * Math.PI) / 180;
        g.setTransform(dpr, 0, 0, dpr, hi * cell + cell / 2, gi * cell + cell / 2);
        g.rotate(a); // clockwise on screen, from north
        g.beginPath();
        g.moveTo(0, -r);
        g.lineTo(0.7 * r, 0.8 * r);
        g.lineTo(0, 0.3 * r);
        g.lineTo(-0.7 * r, 0.8 * r);
        g.closePath();
        g.fillStyle = COLORS[GROUPS[gi]];
        g.fill();
        g.strokeStyle = 'rgba(5, 10, 16, 0.85)';
        g.lineWidth = r > 5 ? 1 : 0.75;
        g.stroke();
      }
    }
    sprites.canvas = c;
    sprites.px = new Uint32Array(g.getImageData(0, 0, c.width, c.height).data.buffer);
    sprites.atlasWidth = c.width;
    sprites.r = r;
    sprites.dpr = dpr;
    sprites.cell = cell;
  }

  function groupOf(t) {
    if (t.status === 'blocked' || t.status === 'unknown' || t.status === 'disallowed') return 'blocked';
    if (t.move === 'moving' || t.move === 'stopped' || t.move === 'parked') return t.move;
    return 'none';
  }

  function drawMap() {
    prof.start();
    if (dirty.bg) {
      drawBackground();
      dirty.bg = false;
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.drawImage(bg, 0, 0);
    prof.mark('background');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const S = scale();
    const ox = cw / 2 - view.cx * S;
    const oy = ch / 2 - view.cy * S;
    const n = trackers.size;
    const r = n > 3000 ? 4.5 : n > 300 ? 6 : 8;
    const margin = 60;
    const stale = session.phase === 'ended';
    let visible = 0;
    let outside = 0;
    for (const g of GROUPS) groupPaths[g].length = 0;

    // Tracks: one path for live trackers, one for blocked ones.
    const live = new Path2D();
    const grey = new Path2D();
    for (const t of trackers.values()) {
      if (!(t.wx === t.wx)) {
        t.sx = t.sy = NaN;
        continue;
      }
      const sx = t.wx * S + ox;
      const sy = t.wy * S + oy;
      t.sx = sx;
      t.sy = sy;
      const group = groupOf(t);
      t.drawnGroup = group;
      // Near or past an edge (the bottom holds the legend): a cue to refit while auto-fitting.
      if (sx < 24 || sy < 24 || sx > cw - 24 || sy > ch - 56) outside++;
      if (sx < -margin || sy < -margin || sx > cw + margin || sy > ch + margin) continue;
      visible++;
      groupPaths[group].push(t);
      if (t.trackLen > 1) {
        const p = group === 'blocked' ? grey : live;
        const start = (t.trackHead - t.trackLen + TRACK_POINTS) % TRACK_POINTS;
        for (let k = 0; k < t.trackLen; k++) {
          const i = ((start + k) % TRACK_POINTS) * 2;
          const x = t.track[i] * S + ox;
          const y = t.track[i + 1] * S + oy;
          if (k === 0) p.moveTo(x, y);
          else p.lineTo(x, y);
        }
      }
    }
    prof.mark('prep');
    ctx.globalAlpha = stale ? 0.35 : 1;
    ctx.lineWidth = n > 3000 ? 1 : 1.6;
    ctx.lineJoin = 'round';
    ctx.strokeStyle = 'rgba(91, 141, 239, 0.55)';
    ctx.stroke(live);
    ctx.strokeStyle = 'rgba(120, 128, 140, 0.4)';
    ctx.stroke(grey);
    prof.mark('tracks');

    // Speed leaders: a line ahead of each moving marker, longer the faster it goes.
    const leaders = new Path2D();
    for (const g of GROUPS) {
      if (g === 'blocked') continue;
      for (const t of groupPaths[g]) {
        if (!(t.speed > 0)) continue;
        const a = (t.heading * Math.PI) / 180;
        const dx = Math.sin(a);
        const dy = -Math.cos(a);
        const len = n > 3000 ? Math.min(14, 2 + t.speed * 0.12) : Math.min(36, 4 + t.speed * 0.3);
        leaders.moveTo(t.sx + dx * r, t.sy + dy * r);
        leaders.lineTo(t.sx + dx * (r + len), t.sy + dy * (r + len));
      }
    }
    ctx.strokeStyle = 'rgba(219, 228, 238, 0.55)';
    ctx.lineWidth = 1;
    ctx.stroke(leaders);
    prof.mark('leaders');

    // Markers: arrows pointing along the heading, copied from a pre-drawn sprite atlas. One
    // path with thousands of sub-paths is slow to fill in a software canvas, and so are
    // thousands of drawImage calls; for large fleets the sprites' pixels are copied by hand
    // into one layer, put and drawn once.
    ensureSprites(r);
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.imageSmoothingEnabled = false; // 1:1 copies
    if (visible >= PIXEL_BLIT_MIN) blitMarkers();
    else {
      const cell = sprites.cell;
      const half = cell / 2;
      for (let gi = 0; gi < GROUPS.length; gi++) {
        const list = groupPaths[GROUPS[gi]];
        for (let k = 0; k < list.length; k++) {
          const t = list[k];
          const x = Math.round(t.sx * dpr - half);
          const y = Math.round(t.sy * dpr - half);
          ctx.drawImage(sprites.canvas, headingIndex(t.heading) * cell, gi * cell, cell, cell, x, y, cell, cell);
        }
      }
    }
    ctx.imageSmoothingEnabled = true;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.globalAlpha = 1;
    prof.mark('markers');

    // Labels when few markers are on screen.
    if (visible <= 150) {
      ctx.font = '11px system-ui, "DejaVu Sans", sans-serif';
      ctx.textBaseline = 'middle';
      ctx.lineWidth = 3;
      ctx.strokeStyle = 'rgba(11, 18, 27, 0.9)';
      for (const g of GROUPS) {
        ctx.fillStyle = g === 'blocked' ? 'rgba(170, 178, 190, 0.8)' : 'rgba(230, 236, 244, 0.95)';
        for (const t of groupPaths[g]) {
          const text = t.label + (t.speed != null && g !== 'blocked' ? ' \u00b7 ' + t.speed + ' km/h' : '') + (g === 'blocked' ? ' \u00b7 ' + t.status : '');
          ctx.strokeText(text, t.sx + r + 5, t.sy);
          ctx.fillText(text, t.sx + r + 5, t.sy);
        }
      }
    }

    const sel = ui.selected == null ? null : trackers.get(ui.selected);
    if (sel && sel.sx === sel.sx) {
      ctx.strokeStyle = '#ffffff';
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(sel.sx, sel.sy, r + 6, 0, 2 * Math.PI);
      ctx.stroke();
    }
    return outside;
  }

  /** Time per drawing phase, accumulated (shown by the benchmark). */
  const prof = {
    t: 0,
    ms: {},
    start() {
      this.t = performance.now();
    },
    mark(name) {
      const now = performance.now();
      this.ms[name] = (this.ms[name] || 0) + (now - this.t);
      this.t = now;
    },
  };

  // --- table: a virtual list, only the rows on screen exist -----------------------------------

  const listEl = $('list');
  const bodyEl = $('list-body');
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });
  let order = [];
  const pool = [];
  let emptyEl = null;

  function rebuildOrder() {
    const f = $('filter').value.trim().toLowerCase();
    order = [];
    for (const t of trackers.values()) if (!f || t.search.includes(f)) order.push(t);
    order.sort((a, b) => collator.compare(a.label, b.label) || a.id - b.id);
    order = order.map((t) => t.id);
    bodyEl.style.height = order.length * ROW_H + 'px';
    $('count').textContent =
      order.length === trackers.size ? trackers.size + ' trackers' : order.length + ' of ' + trackers.size + ' trackers';
    for (const r of pool) r.id = null;
    if (!emptyEl) {
      emptyEl = document.createElement('div');
      emptyEl.className = 'empty';
      listEl.appendChild(emptyEl);
    }
    emptyEl.textContent = trackers.size ? 'No tracker matches the filter.' : session.hash ? 'No trackers yet.' : '';
    emptyEl.hidden = order.length > 0 || !emptyEl.textContent;
  }

  function makeRow() {
    const el = document.createElement('div');
    el.setAttribute('role', 'row');
    const cells = [];
    for (let i = 0; i < 6; i++) {
      const c = document.createElement('span');
      c.setAttribute('role', 'cell');
      cells.push(c);
      el.appendChild(c);
    }
    cells[0].className = 'label-cell';
    const mk = document.createElement('i');
    mk.className = 'mk';
    const name = document.createElement('span');
    const idEl = document.createElement('span');
    idEl.className = 'id';
    cells[0].append(mk, name, idEl);
    const pill = document.createElement('span');
    cells[1].appendChild(pill);
    cells[4].className = 'num';
    cells[5].className = 'time';
    bodyEl.appendChild(el);
    return { el, cells, name, idEl, pill, id: null, version: -1, top: -1, sel: false };
  }

  function fillRow(r, t) {
    const sel = ui.selected === t.id;
    if (r.id === t.id && r.version === t.version && r.sel === sel) return;
    r.id = t.id;
    r.version = t.version;
    r.sel = sel;
    const status = t.status || 'pending';
    r.el.className = 'row ' + status + (t.move ? ' ' + t.move : '') + (sel ? ' selected' : '');
    r.el.dataset.id = t.id;
    r.el.dataset.status = status;
    r.name.textContent = t.label;
    r.idEl.textContent = t.id > 0 ? '#' + t.id : '';
    r.pill.className = 'pill ' + status;
    r.pill.textContent = t.status || '\u2026';
    r.cells[2].textContent = t.conn || '\u2014';
    r.cells[2].className = t.conn ? 'cs-' + t.conn : '';
    r.cells[3].textContent = t.move || '\u2014';
    r.cells[4].textContent = t.speed == null ? '\u2014' : String(t.speed);
    r.cells[5].textContent = t.last || '\u2014';
  }

  function renderTable() {
    const offset = Math.max(0, listEl.scrollTop - bodyEl.offsetTop);
    const first = Math.floor(offset / ROW_H);
    const count = Math.ceil(listEl.clientHeight / ROW_H) + 2;
    while (pool.length < count) pool.push(makeRow());
    for (let k = 0; k < pool.length; k++) {
      const r = pool[k];
      const i = first + k;
      const t = k < count && i < order.length ? trackers.get(order[i]) : undefined;
      if (!t) {
        if (!r.el.hidden) {
          r.el.hidden = true;
          r.id = null;
          delete r.el.dataset.id;
        }
        continue;
      }
      r.el.hidden = false;
      if (r.top !== i) {
        r.el.style.transform = 'translateY(' + i * ROW_H + 'px)';
        r.top = i;
      }
      fillRow(r, t);
    }
  }

  // --- the frame loop ---------------------------------------------------------------------------

  const dirty = { map: true, bg: true, table: true, order: true };
  let rafPending = false;
  let continuous = false; // the benchmark keeps frames coming to measure them

  function invalidate() {
    if (!rafPending) {
      rafPending = true;
      requestAnimationFrame(frame);
    }
  }

  function frame(now) {
    rafPending = false;
    const t0 = performance.now();
    if (dirty.order) {
      rebuildOrder();
      dirty.order = false;
      dirty.table = true;
    }
    if (!view.userMoved && !view.fitted && fit()) dirty.map = true;
    if (dirty.map) {
      dirty.map = false;
      const outside = drawMap();
      // Keep the whole fleet in view until the user pans or zooms (refit at most every 2 s).
      if (outside > 0 && !view.userMoved && t0 - view.lastFit > 2000 && fit()) dirty.map = true;
    }
    if (dirty.table) {
      dirty.table = false;
      renderTable();
    }
    const work = performance.now() - t0;
    stats.frame(now, work);
    if (continuous || dirty.map || dirty.table) invalidate();
  }

  // --- statistics (frames per second, frame time, updates per second) -------------------------

  const stats = {
    applied: 0,
    messages: 0,
    handleMs: 0,
    frames: 0,
    times: [], // rAF timestamps
    works: [], // JS work per frame, ms
    samples: [], // {t, applied, handleMs} every 250 ms

    frame(now, work) {
      this.frames++;
      this.times.push(now);
      this.works.push(work);
      if (this.times.length > 4000) {
        this.times.splice(0, 2000);
        this.works.splice(0, 2000);
      }
    },

    sample() {
      const t = performance.now();
      this.samples.push({ t, applied: this.applied, handleMs: this.handleMs });
      while (this.samples.length > 2 && this.samples[0].t < t - STATS_WINDOW_MS) this.samples.shift();
    },

    /** Aggregates over the last STATS_WINDOW_MS. */
    summary() {
      const now = performance.now();
      const from = now - STATS_WINDOW_MS;
      let i = this.times.length;
      while (i > 0 && this.times[i - 1] >= from) i--;
      const times = this.times.slice(i);
      const works = this.works.slice(i).sort((a, b) => a - b);
      const gaps = [];
      for (let k = 1; k < times.length; k++) gaps.push(times[k] - times[k - 1]);
      gaps.sort((a, b) => a - b);
      const pct = (arr, p) => (arr.length ? arr[Math.min(arr.length - 1, Math.floor(arr.length * p))] : 0);
      const mean = (arr) => (arr.length ? arr.reduce((a, b) => a + b, 0) / arr.length : 0);
      const span = times.length > 1 ? times[times.length - 1] - times[0] : 0;
      const s0 = this.samples[0];
      const dt = s0 ? (now - s0.t) / 1000 : 0;
      const round = (v) => Math.round(v * 100) / 100;
      return {
        trackers: trackers.size,
        window_ms: STATS_WINDOW_MS,
        frames: times.length,
        fps: round(span > 0 ? ((times.length - 1) * 1000) / span : 0),
        frame_ms_mean: round(mean(works)),
        frame_ms_p95: round(pct(works, 0.95)),
        frame_ms_max: round(works.length ? works[works.length - 1] : 0),
        interval_ms_p95: round(pct(gaps, 0.95)),
        interval_ms_max: round(gaps.length ? gaps[gaps.length - 1] : 0),
        updates_per_s: round(dt > 0 ? (this.applied - s0.applied) / dt : 0),
        handle_ms_per_s: round(dt > 0 ? (this.handleMs - s0.handleMs) / dt : 0),
        applied_total: this.applied,
        phases_ms_total: Object.assign({}, prof.ms),
        messages_total: this.messages,
      };
    },
  };
  let logTick = 0;
  setInterval(() => {
    stats.sample();
    ui.foot();
    if (bench.on) ui.hud();
    // `&log=1`: the figures on the console every 2 s too (for runs without WebDriver).
    if (bench.on && params.get('log') === '1' && ++logTick % 8 === 0) {
      console.log('FGSTATS ' + JSON.stringify(stats.summary()));
    }
  }, 250);

  // --- user interface -------------------------------------------------------------------------

  const ui = {
    selected: null,
    countdown: 0,

    conn(state, text) {
      clearInterval(this.countdown);
      this.countdown = 0;
      $('conn').dataset.state = state;
      $('conn-text').textContent = text;
    },

    reconnectCountdown() {
      const tick = () => {
        const s = Math.max(0, (session.retryAt - performance.now()) / 1000);
        $('conn').dataset.state = 'reconnecting';
        $('conn-text').textContent =
          'reconnecting in ' + s.toFixed(1) + ' s' + (session.lastError ? ' \u00b7 ' + session.lastError : '');
      };
      this.conn('reconnecting', '');
      tick();
      this.countdown = setInterval(tick, 200);
    },

    who(text) {
      $('who').textContent = text;
    },

    showBanner(text) {
      $('banner-text').textContent = text;
      $('banner').hidden = false;
    },

    hideBanner() {
      $('banner').hidden = true;
    },

    showSignIn(error) {
      $('signin').hidden = false;
      this.signInError(error || '');
      const login = $('login');
      if (!login.value) login.focus();
    },

    hideSignIn() {
      $('signin').hidden = true;
    },

    signInError(text) {
      $('signin-error').textContent = text;
    },

    foot() {
      const parts = [];
      if (session.mode && session.phase !== 'idle') parts.push('mode ' + session.mode);
      if (session.userTime) parts.push('user time ' + session.userTime);
      if (session.lastError && session.phase !== 'retry') parts.push(session.lastError);
      $('foot').textContent = parts.join(' \u00b7 ');
    },

    hud() {
      const s = stats.summary();
      $('hud').hidden = false;
      $('hud').textContent =
        'bench: ' + s.trackers + ' trackers, ' + bench.rate + ' updates/s as ' + bench.feed + '\n' +
        'fps             ' + s.fps.toFixed(1) + '\n' +
        'frame (JS)      ' + s.frame_ms_mean.toFixed(2) + ' ms mean \u00b7 ' + s.frame_ms_p95.toFixed(2) + ' p95 \u00b7 ' + s.frame_ms_max.toFixed(1) + ' max\n' +
        'frame interval  ' + s.interval_ms_p95.toFixed(1) + ' ms p95 \u00b7 ' + s.interval_ms_max.toFixed(1) + ' max\n' +
        'updates applied ' + Math.round(s.updates_per_s) + '/s\n' +
        'message cost    ' + s.handle_ms_per_s.toFixed(1) + ' ms/s (parse + apply)';
    },

    select(id, center) {
      this.selected = id;
      const t = id == null ? null : trackers.get(id);
      if (t && center && t.wx === t.wx) {
        view.cx = t.wx;
        view.cy = t.wy;
        if (view.zoom < 12) view.zoom = 12;
        view.userMoved = true;
        dirty.bg = true;
      }
      if (t && !center) {
        const i = order.indexOf(id);
        const top = bodyEl.offsetTop + i * ROW_H;
        if (i >= 0 && (top < listEl.scrollTop + bodyEl.offsetTop || top > listEl.scrollTop + listEl.clientHeight - ROW_H)) {
          listEl.scrollTop = Math.max(0, top - listEl.clientHeight / 2);
        }
      }
      dirty.map = dirty.table = true;
      invalidate();
    },
  };

  function hitTest(mx, my) {
    let best = null;
    let bestD = 14 * 14;
    for (const t of trackers.values()) {
      const dx = t.sx - mx;
      const dy = t.sy - my;
      const d = dx * dx + dy * dy;
      if (d < bestD) {
        bestD = d;
        best = t.id;
      }
    }
    return best;
  }

  function wireEvents() {
    new ResizeObserver(resize).observe($('map-wrap'));
    listEl.addEventListener('scroll', () => {
      dirty.table = true;
      invalidate();
    }, { passive: true });
    new ResizeObserver(() => {
      dirty.table = true;
      invalidate();
    }).observe(listEl);
    $('filter').addEventListener('input', () => {
      dirty.order = true;
      invalidate();
    });
    bodyEl.addEventListener('click', (e) => {
      const row = e.target.closest('.row');
      if (row && row.dataset.id) ui.select(Number(row.dataset.id), true);
    });

    let drag = null;
    canvas.addEventListener('pointerdown', (e) => {
      drag = { x: e.clientX, y: e.clientY, cx: view.cx, cy: view.cy, moved: false };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener('pointermove', (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x;
      const dy = e.clientY - drag.y;
      if (!drag.moved && dx * dx + dy * dy < 16) return;
      drag.moved = true;
      canvas.classList.add('dragging');
      const S = scale();
      view.cx = drag.cx - dx / S;
      view.cy = drag.cy - dy / S;
      view.userMoved = true;
      dirty.bg = dirty.map = true;
      invalidate();
    });
    const endDrag = (e) => {
      if (!drag) return;
      canvas.classList.remove('dragging');
      if (!drag.moved) {
        const rect = canvas.getBoundingClientRect();
        ui.select(hitTest(e.clientX - rect.left, e.clientY - rect.top), false);
      }
      drag = null;
    };
    canvas.addEventListener('pointerup', endDrag);
    canvas.addEventListener('pointercancel', () => {
      drag = null;
      canvas.classList.remove('dragging');
    });
    canvas.addEventListener('wheel', (e) => {
      e.preventDefault();
      const rect = canvas.getBoundingClientRect();
      const unit = e.deltaMode === 1 ? 0.05 : e.deltaMode === 2 ? 1 : 0.0015;
      zoomAt(e.clientX - rect.left, e.clientY - rect.top, -e.deltaY * unit);
    }, { passive: false });
    canvas.addEventListener('dblclick', (e) => {
      const rect = canvas.getBoundingClientRect();
      zoomAt(e.clientX - rect.left, e.clientY - rect.top, e.shiftKey ? -1 : 1);
    });

    $('fit').addEventListener('click', () => {
      view.userMoved = false;
      fit();
      invalidate();
    });
    $('signout').addEventListener('click', () => session.signOut());
    $('banner-signin').addEventListener('click', () => ui.showSignIn(''));
    $('login-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const login = $('login').value.trim();
      if (login) signInWithPassword(login, $('password').value);
    });
    $('hash-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const hash = $('hash').value.trim();
      if (hash.length !== 32) {
        ui.signInError('A session hash has exactly 32 characters.');
        return;
      }
      session.start(hash, null);
    });
  }

  // --- benchmark: synthetic traffic through handleText ----------------------------------------

  const bench = { on: false, n: 0, rate: 0, feed: 'state' };

  function pad2(v) {
    return v < 10 ? '0' + v : '' + v;
  }

  function nowText() {
    const d = new Date();
    return d.getFullYear() + '-' + pad2(d.getMonth() + 1) + '-' + pad2(d.getDate()) + ' ' +
      pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
  }

  /**
   * `?bench=N[&rate=R][&feed=batch]`: N synthetic trackers around Berlin, R state updates a
   * second (default 1000), written as the gateway's JSON text and passed to the same handleText
   * as the socket's frames: one `state` event per update, or with `feed=batch` one `state_batch`
   * a second holding each changed tracker's latest state (as the gateway's batches do).
   */
  function startBench(n, rate, batched) {
    bench.on = true;
    bench.feed = batched ? 'state_batch' : 'state';
    bench.n = n;
    bench.rate = rate;
    continuous = true;
    session.phase = 'bench';
    session.mode = 'bench';
    session.userTime = nowText();
    ui.who('no gateway traffic: synthetic states through the page\u2019s message path');
    const list = [];
    const lat = new Float64Array(n);
    const lng = new Float64Array(n);
    const heading = new Float64Array(n);
    const speed = new Float64Array(n);
    const value = {};
    for (let i = 0; i < n; i++) {
      const id = i + 1;
      list.push({ id, label: 'Bench ' + id, source: { id: 500000 + id, blocked: id % 97 === 0 } });
      value[id] = id % 97 === 0 ? 'blocked' : 'normal';
      lat[i] = 52.52 + (Math.random() - 0.5) * 0.9;
      lng[i] = 13.405 + (Math.random() - 0.5) * 1.5;
      heading[i] = Math.random() * 360;
      speed[i] = Math.random() < 0.2 ? 0 : 20 + Math.random() * 60;
    }
    applyTrackerList(list);
    session.phase = 'state?';
    session.pendingState = 1;
    handleText(JSON.stringify({ type: 'response', action: 'subscription/subscribe', events: ['state'], data: { state: { success: true, value } } }));
    session.phase = 'bench';
    session.mode = 'bench';
    ui.conn('live', 'benchmark: ' + n + ' synthetic trackers, ' + rate + ' updates/s as ' + bench.feed);
    const stateJson = (i, ut) => {
      const id = i + 1;
      const moving = speed[i] > 0;
      return '{"source_id":' + (500000 + id) + ',"gps":{"updated":"' + ut +
        '","signal_level":100,"location":{"lat":' + lat[i] + ',"lng":' + lng[i] +
        '},"heading":' + Math.round(heading[i]) + ',"speed":' + Math.round(speed[i]) +
        ',"alt":34},"connection_status":"active","movement_status":"' + (moving ? 'moving' : 'parked') +
        '","movement_status_update":"' + ut + '","ignition":' + moving + ',"ignition_update":"' + ut +
        '","last_update":"' + ut + '"}';
    };
    const event = (i, ut) =>
      '{"type":"event","event":"state","user_time":"' + ut + '","tracker_id":' + (i + 1) + ',"data":' + stateJson(i, ut) + '}';
    let ut = nowText();
    // The snapshot after subscribing: every normal tracker once.
    const live = [];
    for (let i = 0; i < n; i++) if (value[i + 1] === 'normal') live.push(i);
    if (batched) {
      handleText('{"type":"event","event":"state_batch","user_time":"' + ut + '","data":[' +
        live.map((i) => '{"type":"source_state_event","state":' + stateJson(i, ut) + '}').join(',') + ']}');
    } else {
      for (const i of live) handleText(event(i, ut));
    }
    const t0 = performance.now();
    let sent = 0;
    let pending = new Map(); // batch feed: tracker index → its latest state, as the gateway keeps
    let lastBatch = t0;
    setInterval(() => {
      ut = nowText();
      const now = performance.now();
      const owed = Math.floor((rate * (now - t0)) / 1000) - sent;
      for (let k = 0; k < owed; k++) {
        const i = live[Math.floor(Math.random() * live.length)];
        if (Math.random() < 0.02) speed[i] = speed[i] > 0 ? 0 : 20 + Math.random() * 60;
        if (speed[i] > 0) {
          heading[i] = (heading[i] + (Math.random() - 0.5) * 30 + 360) % 360;
          speed[i] = Math.max(10, Math.min(110, speed[i] + (Math.random() - 0.5) * 8));
          const m = 200 + speed[i] * 4; // metres per update: visible at a city zoom
          const a = (heading[i] * Math.PI) / 180;
          lat[i] += (m * Math.cos(a)) / 111320;
          lng[i] += (m * Math.sin(a)) / (111320 * Math.cos((lat[i] * Math.PI) / 180));
        }
        if (batched) pending.set(i, stateJson(i, ut));
        else handleText(event(i, ut));
      }
      sent += Math.max(0, owed);
      if (batched && now - lastBatch >= 1000) {
        lastBatch = now;
        const items = [];
        for (const json of pending.values()) items.push('{"type":"source_state_event","state":' + json + '}');
        pending = new Map();
        handleText('{"type":"event","event":"state_batch","user_time":"' + ut + '","data":[' + items.join(',') + ']}');
      }
    }, 10);
  }

  // --- read-only view for tests and integrators -----------------------------------------------

  function snapshot(t) {
    const track = [];
    const start = (t.trackHead - t.trackLen + TRACK_POINTS) % TRACK_POINTS;
    for (let k = 0; k < t.trackLen; k++) {
      const i = ((start + k) % TRACK_POINTS) * 2;
      track.push({ lat: yToLat(t.track[i + 1]), lng: xToLng(t.track[i]) });
    }
    return Object.freeze({
      id: t.id,
      label: t.label,
      source_id: t.sourceId,
      status: t.status,
      connection_status: t.conn,
      movement_status: t.move,
      speed: t.speed,
      heading: t.heading,
      lat: t.lat === t.lat ? t.lat : null,
      lng: t.lng === t.lng ? t.lng : null,
      last_update: t.last,
      updates: t.updates,
      track: Object.freeze(track),
    });
  }

  Object.defineProperty(window, 'fleetgate', {
    value: Object.freeze({
      /** Tracker ids in the model (the table's rows, before filtering). */
      trackerIds: () => [...trackers.keys()],
      /** A copy of one tracker's state as the page holds it, or null. */
      tracker: (id) => {
        const t = trackers.get(Number(id));
        return t ? snapshot(t) : null;
      },
      /** Where the tracker's marker was last drawn (CSS px within the map canvas), or null. */
      marker: (id) => {
        const t = trackers.get(Number(id));
        if (!t || !(t.sx === t.sx)) return null;
        return Object.freeze({ x: t.sx, y: t.sy, greyed: t.drawnGroup === 'blocked', group: t.drawnGroup });
      },
      /** Connection phase, subscription mode, banner text (null when hidden), last error. */
      status: () => Object.freeze({
        phase: session.phase,
        mode: session.mode,
        connection: $('conn').dataset.state,
        banner: $('banner').hidden ? null : $('banner-text').textContent,
        user_time: session.userTime,
        last_error: session.lastError,
      }),
      /** Frames per second, frame time and update rate over the last 5 s. */
      stats: () => Object.freeze(stats.summary()),
      /** The map's centre and zoom, the tile URL in use and how many tiles have loaded. */
      view: () => Object.freeze({
        lat: yToLat(view.cy),
        lng: xToLng(view.cx),
        zoom: view.zoom,
        tile_url: tileUrl,
        tiles_loaded: tilesLoaded,
      }),
    }),
    writable: false,
    configurable: false,
    enumerable: true,
  });

  // --- start ----------------------------------------------------------------------------------

  async function loadConfig() {
    const r = await fetchJson('/web/config.json');
    if (r.body && typeof r.body.tile_url === 'string' && r.body.tile_url) {
      tileUrl = r.body.tile_url;
      dirty.bg = dirty.map = true;
      invalidate();
    }
  }

  function main() {
    wireEvents();
    resize();
    loadConfig();
    const n = Math.floor(Number(params.get('bench')));
    if (n > 0) {
      const rate = Math.floor(Number(params.get('rate'))) || 1000;
      startBench(Math.min(n, 200000), Math.max(1, Math.min(rate, 1000000)), params.get('feed') === 'batch');
      return;
    }
    let hash = null;
    let login = null;
    try {
      hash = sessionStorage.getItem(HASH_KEY);
      login = sessionStorage.getItem(LOGIN_KEY);
    } catch (_) {
      /* ignore */
    }
    if (hash && hash.length === 32) session.start(hash, login);
    else {
      ui.conn('signed-out', 'not signed in');
      ui.showSignIn('');
    }
    invalidate();
  }

  main();
})();
