// The play page: frames from the WebSocket paced at 25 fps through a small jitter buffer; the
// held keys and mouse motion sent as they change; fps and press-to-frame latency measured here.
(() => {
  'use strict';
  const FPS = 25, FRAME_MS = 1000 / FPS;
  const JITTER_FRAMES = 2;       // frames buffered before playback starts
  const MAX_BUFFER = 18;         // beyond this the oldest frames are skipped (latency stays low)
  const MOUSE_SEND_MS = 33;      // mouse motion is summed and sent at most this often
  // the server's FRAME_HEADER, struct '<4sIHHIddd': magic, block (u32), frame index (u16), frames in
  // the block (u16), input id (u32), block start, frames ready, send time (f64 ms): 40 bytes
  const HEADER_BYTES = 40, MAGIC = 'WANF';

  const $ = (id) => document.getElementById(id);
  const canvas = $('screen'), ctx = canvas.getContext('2d');
  const params = new URLSearchParams(location.search);
  const token = params.get('token');

  const newTabId = () => (crypto.randomUUID ? crypto.randomUUID() :
    String(Math.random()).slice(2) + String(Date.now())).replace(/-/g, '');
  let tabId = sessionStorage.getItem('wan-play-tab') || newTabId();
  sessionStorage.setItem('wan-play-tab', tabId);
  let playMode = params.get('play') || sessionStorage.getItem('wan-play-mode') || 'continuous';
  $('play-mode').value = playMode;

  // what the tests (and a curious player) can read
  const state = window.wanPlay = {
    connected: false, hello: null, framesShown: 0, framesReceived: 0, framesBad: 0, latencies: [],
    lastShownInputId: 0, lastError: null, full: null, stats: null, lastShown: null,
    framesReplaced: 0, framesReplacedLate: 0,
  };
  let ws = null, controls = null, held = new Set(), inputId = 0, pressed = [];
  let mouseDx = 0, mouseDy = 0, buffer = [], playing = false, nextDue = 0, shownTimes = [];
  let lastShownKey = -1, lastShownAt = 0;  // block * 65536 + index of the frame on screen (this game)
  let reconnect = true;

  function status(text) { $('status').textContent = text; }
  function showError(text) {
    state.lastError = text;
    $('error').textContent = text;
    clearTimeout(showError.timer);
    showError.timer = setTimeout(() => { $('error').textContent = ''; }, 5000);
  }
  function overlay(text) { const o = $('overlay'); o.textContent = text || ''; o.hidden = !text; }

  function connect() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let url = `${proto}//${location.host}/ws?session=${tabId}&frames=ws&play=${playMode}`;
    if (token) url += `&token=${encodeURIComponent(token)}`;
    ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => { state.connected = true; status('connected'); };
    ws.onclose = (event) => {
      state.connected = false;
      if (event.code === 1013 || event.code === 1008 || !reconnect) return;
      status('disconnected: reconnecting…');
      overlay('Reconnecting…');
      setTimeout(connect, 1000);
    };
    ws.onmessage = (event) => {
      if (typeof event.data === 'string') onText(JSON.parse(event.data));
      else onFrame(event.data);
    };
  }

  function send(message) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
  }

  function onText(m) {
    if (m.type === 'hello') {
      state.hello = m;
      controls = m.controls;
      $('mode').textContent = `(${controls.mode})`;
      $('players').textContent = `${m.players}/${m.capacity}`;
      $('demo-badge').hidden = !m.demo;
      $('mouse-hint').hidden = !controls.camera;
      if (Array.isArray(m.frame_size) && m.frame_size[0] > 0 && m.frame_size[1] > 0) {
        const [h, w] = m.frame_size;  // the model's frames (H, W): the canvas keeps their shape
        const height = Math.round(canvas.width * h / w);
        if (canvas.height !== height) canvas.height = height;
        canvas.style.aspectRatio = `${w} / ${h}`;
      }
      const list = $('controls');
      list.innerHTML = '';
      for (const key of controls.keys) {
        const li = document.createElement('li');
        li.innerHTML = `<kbd data-key="${key}">${key.toUpperCase()}</kbd>`;
        li.append(controls.labels[key] || key);
        list.append(li);
      }
      status(`connected: ${m.play_mode}${m.play_mode === 'continuous'
        ? (m.reactive ? ' · reactive' : ' · blocks only') : ''}${m.demo ? ' · demo' : ''}`);
      overlay('Starting…');
      canvas.focus();
    } else if (m.type === 'stats') {
      state.stats = m;
      $('players').textContent = `${m.players}/${m.capacity}`;
    } else if (m.type === 'error') {
      showError(m.reason);
    } else if (m.type === 'full') {
      state.full = m.reason;
      reconnect = false;
      if (m.capacity) $('players').textContent = `${m.players}/${m.capacity}`;
      overlay('Server full');
      status(m.reason);
    } else if (m.type === 'idle') {
      reconnect = false;
      overlay('Closed for inactivity — reload to play again');
      status(m.reason);
    } else if (m.type === 'game') {
      buffer = []; playing = false; lastShownKey = -1;
      status(`playing: game ${m.game}${m.demo ? ' · demo' : ''}`);
    }
  }

  function onFrame(data) {
    if (data.byteLength < HEADER_BYTES) return;
    const view = new DataView(data);
    const magic = String.fromCharCode(...new Uint8Array(data, 0, 4));
    if (magic !== MAGIC) return;
    const entry = { block: view.getUint32(4, true), index: view.getUint16(8, true),
                    inputId: view.getUint32(12, true), bitmap: null };
    entry.key = entry.block * 65536 + entry.index;
    state.framesReceived++;
    // a re-made block's frames (reactive play) replace the ones not shown yet; a frame whose
    // place has been shown already comes too late and is dropped
    if (entry.key <= lastShownKey) { state.framesReplacedLate++; return; }
    const same = buffer.findIndex((e) => e.key === entry.key);
    if (same >= 0) {
      const old = buffer[same];
      if (old.bitmap && old.bitmap.close) old.bitmap.close();
      else old.bitmap = 'gone';
      buffer[same] = entry;
      state.framesReplaced++;
    } else {
      let at = buffer.length;  // in frame order (they arrive in order but for re-makes)
      while (at > 0 && buffer[at - 1].key > entry.key) at--;
      buffer.splice(at, 0, entry);
    }
    createImageBitmap(new Blob([new Uint8Array(data, HEADER_BYTES)], { type: 'image/jpeg' }))
      .then((bitmap) => { if (entry.bitmap === 'gone') bitmap.close(); else entry.bitmap = bitmap; })
      .catch(() => { entry.bitmap = 'bad'; });
    while (buffer.length > MAX_BUFFER) {
      const dropped = buffer.shift();
      if (dropped.bitmap && dropped.bitmap.close) dropped.bitmap.close();
      else dropped.bitmap = dropped.bitmap || 'gone';
    }
  }

  function show(entry, now) {
    if (entry.bitmap === 'bad') { state.framesBad++; return false; }  // not a decodable JPEG
    ctx.drawImage(entry.bitmap, 0, 0, canvas.width, canvas.height);
    entry.bitmap.close();
    lastShownKey = entry.key;
    lastShownAt = now;
    state.lastShown = [entry.block, entry.index];
    overlay('');
    state.framesShown++;
    state.lastShownInputId = entry.inputId;
    shownTimes.push(now);
    // the first frame that reflects a press: press-to-frame latency as the player sees it
    while (pressed.length && pressed[0].id <= entry.inputId) {
      const press = pressed.shift();
      state.latencies.push(now - press.t);
      if (state.latencies.length > 50) state.latencies.shift();
      const sorted = [...state.latencies].sort((a, b) => a - b);
      $('latency').textContent = `${sorted[Math.floor(sorted.length / 2)].toFixed(0)} ms`;
    }
    return true;
  }

  function tick(now) {
    if (!playing && buffer.length >= JITTER_FRAMES) { playing = true; nextDue = now; }
    if (playing) {
      if (!buffer.length) playing = false;
      else if (now >= nextDue && buffer[0].bitmap) {
        if (show(buffer.shift(), now)) nextDue = Math.max(nextDue + FRAME_MS, now - FRAME_MS);
      }
    }
    // frames shown in the last second (drops to 0 when the frames stop, instead of keeping the
    // rate of the last burst)
    while (shownTimes.length && now - shownTimes[0] >= 1000) shownTimes.shift();
    $('fps').textContent = shownTimes.length.toFixed(1);
    requestAnimationFrame(tick);
  }

  function sendInput(press) {
    inputId++;
    const message = { type: 'input', id: inputId, keys: [...held] };
    // the frame on screen now and how long it has been: reactive play splices after it
    if (state.lastShown) message.shown = [...state.lastShown, Math.min(1000, Math.round(performance.now() - lastShownAt))];
    if (mouseDx || mouseDy) { message.mouse = [mouseDx, mouseDy]; mouseDx = mouseDy = 0; }
    if (press) pressed.push({ id: inputId, t: performance.now() });
    send(message);
    for (const k of document.querySelectorAll('kbd[data-key]')) {
      k.classList.toggle('down', held.has(k.dataset.key));
    }
  }

  function keyOf(event) {
    if (!controls || event.ctrlKey || event.metaKey || event.altKey) return null;
    if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return null;
    const key = event.key.toLowerCase();
    return controls.keys.includes(key) ? key : null;
  }
  document.addEventListener('keydown', (event) => {
    const key = keyOf(event);
    if (!key) return;
    event.preventDefault();
    if (!held.has(key)) { held.add(key); sendInput(true); }
  });
  document.addEventListener('keyup', (event) => {
    const key = keyOf(event);
    if (!key) return;
    event.preventDefault();
    if (held.delete(key)) sendInput(false);
  });
  window.addEventListener('blur', () => { if (held.size) { held.clear(); sendInput(false); } });

  canvas.addEventListener('click', () => {
    canvas.focus();
    if (controls && controls.camera && canvas.requestPointerLock) canvas.requestPointerLock();
  });
  document.addEventListener('mousemove', (event) => {
    if (document.pointerLockElement !== canvas) return;
    mouseDx += event.movementX; mouseDy += event.movementY;
  });
  setInterval(() => { if (mouseDx || mouseDy) sendInput(false); }, MOUSE_SEND_MS);

  function sendImage(dataUrl) {
    send({ type: 'image', data: dataUrl });
    status('start image sent: new game…');
  }
  $('image').addEventListener('change', (event) => {
    const file = event.target.files[0];
    if (!file) return;
    if (file.size > 8 * 1024 * 1024) { showError('image: larger than 8 MiB'); return; }
    const reader = new FileReader();
    reader.onload = () => sendImage(reader.result);
    reader.readAsDataURL(file);
    event.target.value = '';
  });
  $('builtin').addEventListener('click', async () => {
    const blob = await (await fetch('/start-image')).blob();
    const reader = new FileReader();
    reader.onload = () => sendImage(reader.result);
    reader.readAsDataURL(blob);
  });
  $('new-game').addEventListener('click', () => { send({ type: 'reset' }); canvas.focus(); });
  $('play-mode').addEventListener('change', (event) => {
    playMode = event.target.value;
    sessionStorage.setItem('wan-play-mode', playMode);
    tabId = newTabId();                 // a new game in the other mode of play
    sessionStorage.setItem('wan-play-tab', tabId);
    buffer = []; playing = false;
    if (ws) { ws.onclose = null; ws.close(); }
    reconnect = true;
    connect();
  });

  connect();
  requestAnimationFrame(tick);
})();
