// A real browser for sessiongate's sign-in tests: Debian's Chromium, headless, driven
// by playwright-core. It opens an application as an expired device would, follows the
// portal's "Sign in" button, signs in at the provider's own login form, and reports
// each page it saw as one JSON line on stdout:
//
//   node browse.mjs --app URL --login NAME --shots DIR [--start URL] [--again URL]
//
// With --again the same browser then signs in a second time at URL (the portal's
// /refresh-identity), within the provider's single sign-on session.
// With --start the sign-in begins there (the portal's /refresh-identity, for a device
// whose session still lets it reach the application) instead of at the refused app.
// The address the provider sent the browser back to is reported too (step
// "callback"), so a test can replay it.
// Every page is saved as a screenshot in DIR (kept by the test when it fails).
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const opts = {};
for (let i = 2; i < process.argv.length; i += 2) {
  opts[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
}
mkdirSync(opts.shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    // Every address here is an IP: names (fonts and scripts the provider's pages link
    // to on the internet) fail at once instead of waiting on an unreachable resolver.
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 198.18.*, EXCLUDE 198.19.*',
    // A provider behind a test CA: what is tested is the agent's trust, not the browser's.
    '--ignore-certificate-errors',
  ],
});
let step = 0;
const page = await browser.newPage();
page.on('request', (request) => {
  if (new URL(request.url()).pathname === '/callback') {
    console.log(JSON.stringify({ step: 'callback', url: request.url() }));
  }
});
// Pages count as loaded once their document is: the provider's pages may name
// resources on hosts this closed network never answers.
const loaded = { waitUntil: 'domcontentloaded' };
async function seen(what, response) {
  step += 1;
  await page.screenshot({ path: `${opts.shots}/${step}-${what}.png`, fullPage: true });
  console.log(JSON.stringify({
    step: what,
    status: response ? response.status() : null,
    url: page.url(),
    title: await page.title(),
    text: (await page.innerText('body')).slice(0, 2000),
  }));
}

// At the provider: its login form if it shows one (reported as step
// `{prefix}login-form`, or `{prefix}no-login-form`), then its consent if it asks.
async function atProvider(response, prefix) {
  const formShown = (await page.locator('input[name="login"]').count()) > 0;
  await seen(`${prefix}${formShown ? 'login-form' : 'no-login-form'}`, response);
  if (formShown) {
    await page.fill('input[name="login"]', opts.login);
    await page.fill('input[name="password"]', 'any password');
    await Promise.all([page.waitForNavigation(loaded), page.click('button[type="submit"]')]);
  }
  const consent = page.getByRole('button', { name: 'Continue' });
  if ((await consent.count()) > 0) {
    await seen(`${prefix}consent`, null);
    await Promise.all([page.waitForNavigation(loaded), consent.click()]);
  }
}

try {
  let toIdp;
  if (opts.start) {
    toIdp = await page.goto(opts.start, loaded);
  } else {
    // The application, refused: the portal's page.
    await seen('refused', await page.goto(opts.app, loaded));
    // Its button leads to the provider's login form (through the portal's /login).
    [toIdp] = await Promise.all([
      page.waitForNavigation(loaded),
      page.getByRole('link', { name: 'Sign in' }).click(),
    ]);
  }
  await atProvider(toIdp, '');
  await seen('signed-in', null);
  // The application again: now it answers.
  await seen('app', await page.goto(opts.app, loaded));
  if (opts.again) {
    // A second sign-in in the same browser, within the provider's single sign-on, a
    // second later (authentication times have whole seconds).
    await page.waitForTimeout(1100);
    await atProvider(await page.goto(opts.again, loaded), 'again-');
    await seen('again-signed-in', null);
  }
} catch (e) {
  await seen('error', null).catch(() => {});
  console.log(JSON.stringify({ step: 'failed', error: String(e) }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
