// page.mjs - drives jemd's page at / in headless Chromium (puppeteer-core and
// Debian's chromium) the way a person on a phone would: pick an image, read
// the label, run a sample job to the end, then follow the link to the API
// reference at /docs.  Prints what the page showed as one
// JSON object; tests/integration/test_web.py compares it with the API.
//
// usage: [PAGE_MODEL=NAME] node page.mjs URL IMAGE CLASS STEPS SEED [SCREENSHOT.png]
import puppeteer from 'puppeteer-core';

const [url, image, cls, steps, seed, shot] = process.argv.slice(2);
const out = { errors: [] };
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage();
  // a phone, 390 CSS pixels wide with touch; a desktop window for the README's
  // screenshot (changing the viewport later would reload the page)
  await page.setViewport(shot ? { width: 960, height: 800 }
    : { width: 390, height: 844, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  page.on('pageerror', (e) => out.errors.push('page error: ' + e.message));
  page.on('console', (m) => { if (m.type() === 'error') out.errors.push('console: ' + m.text()); });
  page.on('requestfailed', (r) => out.errors.push('request failed: ' + r.url()));
  await page.goto(url, { waitUntil: 'load' });
  await page.waitForSelector('body[data-ready="1"]', { timeout: 15000 });
  out.models = await page.$$eval('#model option', (os) => os.map((o) => o.value));
  // PAGE_MODEL: choose that model first, as a person would with the chooser
  if (process.env.PAGE_MODEL) await page.select('#model', process.env.PAGE_MODEL);

  // classify: pick the file as a person would
  const input = await page.$('#file');
  await input.uploadFile(image);
  await page.waitForFunction(() => !document.getElementById('result').hidden ||
    document.getElementById('classify-status').classList.contains('error'), { timeout: 30000 });
  out.classify = await page.evaluate(() => ({
    status: document.getElementById('classify-status').textContent,
    label: Number(document.getElementById('label').dataset.label),
    class: document.getElementById('label').textContent,
    is_ood: document.getElementById('verdict').dataset.isOod,
    verdict: document.getElementById('verdict').textContent,
    bars: [...document.querySelectorAll('#probs tr')].map((tr) => ({
      label: Number(tr.dataset.label), text: tr.textContent,
      width: tr.querySelector('.fill').getBoundingClientRect().width })),
    scores: [...document.querySelectorAll('#ood tr')].map((tr) => ({
      score: tr.dataset.score, cells: [...tr.cells].map((c) => c.textContent) })),
  }));

  // a sample job to the end
  await page.select('#job-class', cls);
  for (const [id, v] of [['#job-n', shot ? '16' : '4'], ['#job-steps', steps], ['#job-seed', seed]]) {
    await page.$eval(id, (el) => { el.value = ''; });
    await page.type(id, v);
  }
  // the keyboard, as a screen-reader user would (puppeteer's synthetic tap
  // and click miss the button in Chromium's mobile emulation)
  await page.focus('#job-start');
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => document.body.dataset.samplesShown ||
    ['failed', 'canceled'].includes(document.body.dataset.jobStatus) ||
    document.getElementById('job-status').classList.contains('error'), { timeout: 60000 });
  await page.waitForFunction(() => [...document.querySelectorAll('#job-result img')]
    .every((i) => i.complete), { timeout: 10000 }).catch(() => {});
  out.job = await page.evaluate(() => ({
    id: document.body.dataset.job,
    status: document.body.dataset.jobStatus,
    text: document.getElementById('job-status').textContent,
    progress: [document.getElementById('job-progress').value,
      document.getElementById('job-progress').max],
    grid: [document.getElementById('grid').naturalWidth, document.getElementById('grid').alt],
    samples: [...document.querySelectorAll('#samples img')].map((i) => [i.naturalWidth, i.alt]),
  }));

  // usable on a phone and by a screen reader
  out.a11y = await page.evaluate(() => {
    const unlabeled = [...document.querySelectorAll('input, select, button, textarea')]
      .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') &&
        !(el.tagName === 'BUTTON' && el.textContent.trim()))
      .map((el) => el.id || el.outerHTML.slice(0, 60));
    const noAlt = [...document.querySelectorAll('img')].filter((i) => i.src && !i.alt)
      .map((i) => i.id || i.src);
    return { unlabeled, noAlt, lang: document.documentElement.lang,
      live: document.querySelectorAll('[aria-live]').length,
      overflow: document.documentElement.scrollWidth - window.innerWidth };
  });
  if (shot) await page.screenshot({ path: shot, fullPage: true });

  // the API reference the page links to, followed as a person would
  if (!shot) {
    await Promise.all([page.waitForNavigation({ waitUntil: 'load' }),
      page.$eval('a[href="/docs"]', (a) => a.click())]);
    out.docs = await page.evaluate(() => ({
      url: location.pathname,
      title: document.title,
      lang: document.documentElement.lang,
      landmarks: ['nav', 'main'].filter((t) => document.querySelector(t)),
      operations: document.querySelectorAll('section.op h3').length,
      styled: getComputedStyle(document.querySelector('.method')).color === 'rgb(255, 255, 255)',
      overflow: document.documentElement.scrollWidth - window.innerWidth,
    }));
    if (process.env.DOCS_SHOT) await page.screenshot({ path: process.env.DOCS_SHOT });
  }
} catch (e) {
  out.errors.push('driver: ' + e.message);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
