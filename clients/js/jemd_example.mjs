// jemd_example.mjs - calling jemd with fetch (Node 18+, or a browser page on an
// origin jemd allows with --cors-origin): classify an image, run a small
// sample job to the end and save its grid.
//
// usage: node jemd_example.mjs URL IMAGE [GRID.png]
//   JEMD_API_KEY=KEY sends `Authorization: Bearer KEY` (jemd --api-key-file).
// Prints one JSON object: the classification and the finished job.
import { readFile, writeFile } from 'node:fs/promises';

const [url = 'http://127.0.0.1:8080', image, gridOut] = process.argv.slice(2);
const auth = process.env.JEMD_API_KEY ? { Authorization: 'Bearer ' + process.env.JEMD_API_KEY } : {};

// One call; throws with jemd's status, error code and message.
async function call(method, path, body, headers = {}) {
  const res = await fetch(url + path, { method, body, headers: { ...auth, ...headers } });
  const isJson = (res.headers.get('content-type') || '').startsWith('application/json');
  const data = isJson ? await res.json() : new Uint8Array(await res.arrayBuffer());
  if (!res.ok) {
    const e = isJson && data.error;
    throw new Error(`${res.status} ${e && e.code ? e.code + ': ' + e.message : e || res.statusText}`);
  }
  return data;
}

if (!image) {
  console.error('usage: node jemd_example.mjs URL IMAGE [GRID.png]');
  process.exit(2);
}
try {
  // 1. classify: the image's bytes as the body
  const bytes = await readFile(image);
  const type = bytes[0] === 0x89 ? 'image/png' : 'image/jpeg';
  const r = await call('POST', '/v1/classify', bytes, { 'Content-Type': type });
  const top = r.probs.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  console.error(`${image}: ${r.class} (${(100 * r.confidence).toFixed(1)}%), ` +
    `OOD: ${r.ood.is_ood}; top 3: ${top.map(([p, i]) => `${i}=${p.toFixed(3)}`).join(' ')}`);

  // 2. a sample job: 202 + polling until it ends
  let job = await call('POST', '/v1/samples', JSON.stringify({ n: 4, steps: 5, class: r.label, seed: 7 }),
    { 'Content-Type': 'application/json' });
  while (job.status === 'queued' || job.status === 'running') {
    await new Promise((ok) => setTimeout(ok, 200));
    job = await call('GET', '/v1/jobs/' + job.id);
  }
  if (job.status !== 'succeeded') throw new Error(`job ${job.id} ${job.status}`);
  if (gridOut) await writeFile(gridOut, await call('GET', job.result.grid_url));
  console.log(JSON.stringify({ classify: r, job }));
} catch (e) {
  console.error('jemd_example: ' + e.message);
  process.exit(1);
}
