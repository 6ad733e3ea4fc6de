// app.js - the page at / (web/index.html): classify an image, draw samples.
// Built into jemd; talks only to the daemon that served it.
'use strict';

const $ = (id) => document.getElementById(id);
const state = { models: [], model: null, job: null, timer: null, urls: [] };

// ---------------------------------------------------------------------------
// API calls: JSON answers, the key from the page (never stored beyond the tab)

function authHeaders() {
  const key = $('apikey').value.trim();
  return key ? { Authorization: 'Bearer ' + key } : {};
}

async function api(method, path, body, headers) {
  const res = await fetch(path, { method, body, headers: { ...authHeaders(), ...(headers || {}) } });
  let data = null;
  if ((res.headers.get('Content-Type') || '').startsWith('application/json')) data = await res.json();
  if (!res.ok) {
    const e = data && data.error;
    const msg = e ? (typeof e === 'string' ? e : e.message + ' (' + e.code + ')') : res.statusText;
    throw new Error(res.status + ': ' + msg);
  }
  return data;
}

// An image route as a blob: URL (an <img src> could not send the API key).
async function blobUrl(path) {
  const res = await fetch(path, { headers: authHeaders() });
  if (!res.ok) throw new Error(res.status + ' for ' + path);
  const url = URL.createObjectURL(await res.blob());
  state.urls.push(url);
  return url;
}

function setStatus(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle('error', !!isError);
}

// The model routes: the name is sent only when the daemon serves several.
function modelQuery() {
  return state.models.length > 1 ? 'model=' + encodeURIComponent(state.model.name) : '';
}

// ---------------------------------------------------------------------------
// Models

async function loadModels() {
  try {
    const data = await api('GET', '/v1/models');
    state.models = data.models;
  } catch (e) {
    setStatus('classify-status', 'Cannot list the models: ' + e.message, true);
    return;
  }
  const sel = $('model');
  sel.replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
  selectModel(state.models[0] && state.models[0].name);
  document.body.dataset.ready = '1';
}

function selectModel(name) {
  state.model = state.models.find((m) => m.name === name) || null;
  const m = state.model;
  if (!m) return;
  const a = m.architecture;
  $('model-info').textContent = `WRN-${a.depth}-${a.widen}, ${m.classes.length} classes, ` +
    `${m.input_shape.join('×')} input` + (m.ood.present ? ', OOD statistics' : '');
  const cls = $('job-class');
  cls.replaceChildren(new Option('any (unconditional)', ''),
    ...m.classes.map((c, i) => new Option(c, String(i))));
  $('job-steps').value = m.sampler.steps;
  $('job-step-size').value = m.sampler.step_size;
  $('job-n').max = 64;
}

// ---------------------------------------------------------------------------
// Classification

const SCORE_LABELS = {
  energy: 'Energy', grad_norm: 'Gradient norm', max_softmax: 'Max softmax',
  energy_complexity: 'Energy − complexity', mahalanobis: 'Mahalanobis distance',
};

function fmt(v, digits) {
  return v === null || v === undefined ? '—' : Number(v).toPrecision(digits || 4);
}

function pct(p) {
  return p === null || p === undefined ? '—' : (100 * p).toFixed(1) + '%';
}

async function classify(file) {
  if (!file) return;
  if (!state.model) await loadModels();
  const q = [modelQuery(), $('nograd').checked ? 'grad=false' : ''].filter(Boolean).join('&');
  setStatus('classify-status', 'Scoring ' + (file.name || 'the pasted image') + '…');
  const prev = $('preview');
  if (prev.src.startsWith('blob:')) URL.revokeObjectURL(prev.src);
  prev.src = URL.createObjectURL(file);
  try {
    const r = await api('POST', '/v1/classify' + (q ? '?' + q : ''), file,
      { 'Content-Type': file.type || 'application/octet-stream' });
    showResult(r);
    setStatus('classify-status', `${file.name || 'Pasted image'}: ${r.class}.`);
  } catch (e) {
    $('result').hidden = true;
    setStatus('classify-status', 'Could not score the image: ' + e.message, true);
  }
}

function showResult(r) {
  $('label').textContent = r.class;
  $('label').dataset.label = r.label;
  $('confidence').textContent = `(${pct(r.confidence)} confident)`;
  const v = $('verdict');
  const ood = r.ood;
  v.classList.remove('in', 'out');
  if (ood.is_ood === true) {
    v.textContent = 'Out of distribution: not like the images the model was trained on.';
    v.classList.add('out');
  } else if (ood.is_ood === false) {
    v.textContent = 'In distribution: like the images the model was trained on.';
    v.classList.add('in');
  } else {
    v.textContent = 'No verdict: this model has no OOD statistics.';
  }
  v.dataset.isOod = String(ood.is_ood);
  $('rule').textContent = ood.rule ? `Rule at ${pct(ood.tpr)} true-positive rate: ${ood.rule}` : '';

  const names = state.model ? state.model.classes : r.probs.map((_, i) => String(i));
  const order = r.probs.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, 10);
  const max = order.length ? order[0][0] : 1;
  $('probs').replaceChildren(...order.map(([p, i]) => {
    const tr = document.createElement('tr');
    const name = document.createElement('td');
    name.textContent = names[i] || String(i);
    const cell = document.createElement('td');
    const bar = document.createElement('div');
    bar.className = 'bar';
    const fill = document.createElement('div');
    fill.className = 'fill' + (i === r.label ? ' top' : '');
    fill.style.width = (max > 0 ? 75 * p / max : 0) + '%'; // CSSOM: allowed by the page's CSP
    fill.setAttribute('aria-hidden', 'true');
    const num = document.createElement('span');
    num.className = 'num';
    num.textContent = pct(p);
    bar.append(fill, num);
    cell.append(bar);
    tr.append(name, cell);
    tr.dataset.label = i;
    return tr;
  }));

  const sides = (state.model && state.model.ood.scores) || {};
  $('ood').replaceChildren(...Object.entries(ood.scores).map(([k, s]) => {
    const tr = document.createElement('tr');
    tr.dataset.score = k;
    const side = sides[k];
    for (const text of [SCORE_LABELS[k] || k, fmt(s.value), pct(s.percentile),
      side && side !== 'unused' ? 'yes (' + side + ')' : 'no']) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  }));
  $('result').hidden = false;
}

// ---------------------------------------------------------------------------
// Sample jobs

function intField(id) {
  const v = $(id).value.trim();
  return v === '' ? null : Number(v);
}

async function startJob(ev) {
  ev.preventDefault();
  if (!state.model) return;
  const body = { n: intField('job-n'), steps: intField('job-steps'),
    step_size: Number($('job-step-size').value) };
  const cls = $('job-class').value;
  if (cls !== '') body.class = Number(cls);
  const seed = intField('job-seed');
  if (seed !== null) body.seed = seed;
  if (state.models.length > 1) body.model = state.model.name;
  $('job-result').hidden = true;
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  state.urls = [];
  try {
    const job = await api('POST', '/v1/samples', JSON.stringify(body),
      { 'Content-Type': 'application/json' });
    state.job = job;
    $('job-start').disabled = true;
    $('job-cancel').disabled = false;
    showJob(job);
    poll();
  } catch (e) {
    setStatus('job-status', 'Could not start the job: ' + e.message, true);
  }
}

function showJob(job) {
  const p = $('job-progress');
  p.max = job.progress.steps;
  p.value = job.progress.step;
  p.setAttribute('aria-valuetext', `step ${job.progress.step} of ${job.progress.steps}`);
  const cls = job.params.class_name ? `class ${job.params.class_name}` : 'any class';
  setStatus('job-status', `Job ${job.id.slice(0, 8)} (${job.params.n} samples, ${cls}, ` +
    `seed ${job.params.seed}): ${job.status}, step ${job.progress.step} of ${job.progress.steps}` +
    (job.error ? ` (${job.error.message})` : '') + '.', job.status === 'failed');
  document.body.dataset.job = job.id;
  document.body.dataset.jobStatus = job.status;
}

async function poll() {
  const job = state.job;
  if (!job) return;
  try {
    const j = await api('GET', '/v1/jobs/' + job.id);
    state.job = j;
    showJob(j);
    if (j.status === 'queued' || j.status === 'running') {
      state.timer = setTimeout(poll, 400);
      return;
    }
    if (j.status === 'succeeded') await showSamples(j);
  } catch (e) {
    setStatus('job-status', 'Lost the job: ' + e.message, true);
  }
  $('job-start').disabled = false;
  $('job-cancel').disabled = true;
  state.job = null;
}

async function showSamples(j) {
  const grid = $('grid');
  grid.src = await blobUrl(j.result.grid_url);
  grid.alt = `Grid of the ${j.params.n} samples`;
  const items = [];
  for (const s of j.result.samples) {
    const li = document.createElement('li');
    const img = document.createElement('img');
    img.src = await blobUrl(s.url);
    img.alt = `Sample ${s.index + 1}: classified as ${s.class}`;
    const cap = document.createElement('div');
    cap.textContent = `${s.class} · E ${fmt(s.energy, 3)}`;
    li.append(img, cap);
    items.push(li);
  }
  $('samples').replaceChildren(...items);
  $('job-result').hidden = false;
  document.body.dataset.samplesShown = String(items.length);
}

async function cancelJob() {
  if (!state.job) return;
  clearTimeout(state.timer);
  try {
    showJob(await api('DELETE', '/v1/jobs/' + state.job.id));
  } catch (e) {
    setStatus('job-status', 'Could not cancel: ' + e.message, true);
  }
  state.job = null;
  $('job-start').disabled = false;
  $('job-cancel').disabled = true;
}

// ---------------------------------------------------------------------------
// Wiring: pick, drop, paste

function firstImage(items) {
  for (const f of items || []) if (f && f.type && f.type.startsWith('image/')) return f;
  return null;
}

document.addEventListener('DOMContentLoaded', () => {
  const drop = $('drop');
  const file = $('file');
  try { $('apikey').value = sessionStorage.getItem('jemd-key') || ''; } catch (e) { /* private */ }
  $('apikey').addEventListener('change', () => {
    try { sessionStorage.setItem('jemd-key', $('apikey').value); } catch (e) { /* private */ }
  });
  $('model').addEventListener('change', (e) => selectModel(e.target.value));
  file.addEventListener('change', () => classify(file.files[0]));
  drop.addEventListener('click', (e) => { if (e.target !== file) file.click(); });
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); file.click(); }
  });
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    classify(firstImage(e.dataTransfer.files));
  });
  document.addEventListener('paste', (e) => {
    const items = [...(e.clipboardData ? e.clipboardData.items : [])]
      .filter((i) => i.kind === 'file').map((i) => i.getAsFile());
    const f = firstImage(items);
    if (f) classify(f);
  });
  $('job-form').addEventListener('submit', startJob);
  $('job-cancel').addEventListener('click', cancelJob);
  loadModels();
});
