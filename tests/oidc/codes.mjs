// Sign-ins without a browser, for the benchmark: starts COUNT sign-ins at the portal
// and completes each at the provider (its login form, then its consent, over plain
// HTTP with a cookie jar), printing, one per line, the callback address the provider
// sends the browser back to. The callbacks themselves are left to the caller.
//
//   node codes.mjs --portal URL --login NAME --count N
const opts = {};
for (let i = 2; i < process.argv.length; i += 2) {
  opts[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
}
const portal = opts.portal;
const jar = new Map();

function keep(response) {
  for (const cookie of response.headers.getSetCookie()) {
    const pair = cookie.split(';')[0];
    const eq = pair.indexOf('=');
    jar.set(pair.slice(0, eq), pair.slice(eq + 1));
  }
  return response;
}

async function request(url, body) {
  const headers = { cookie: [...jar].map(([k, v]) => `${k}=${v}`).join('; ') };
  const init = { redirect: 'manual', headers };
  if (body !== undefined) {
    init.method = 'POST';
    init.body = body;
    headers['content-type'] = 'application/x-www-form-urlencoded';
  }
  return keep(await fetch(url, init));
}

/// Follows one sign-in from the portal's /login to the callback address.
async function signIn() {
  let response = await request(`${portal}/login`);
  let url = new URL(response.headers.get('location'), portal).href;
  for (let hops = 0; hops < 20; hops += 1) {
    if (url.startsWith(`${portal}/callback`)) {
      return url;
    }
    response = await request(url);
    if (response.status >= 300 && response.status < 400) {
      url = new URL(response.headers.get('location'), url).href;
      continue;
    }
    // One of the provider's own pages: its login form, or its consent.
    const html = await response.text();
    const action = /<form[^>]*action="([^"]+)"/.exec(html);
    if (!action) {
      throw new Error(`no form at ${url} (${response.status})`);
    }
    const target = new URL(action[1], url).href;
    const fields = new URLSearchParams();
    for (const [, name, value] of html.matchAll(/<input type="hidden" name="([^"]+)" value="([^"]*)"/g)) {
      fields.set(name, value);
    }
    if (/name="login"/.test(html)) {
      fields.set('login', opts.login);
      fields.set('password', 'any password');
    }
    response = await request(target, fields.toString());
    url = new URL(response.headers.get('location'), target).href;
  }
  throw new Error('the sign-in did not come back to the portal');
}

for (let i = 0; i < Number(opts.count); i += 1) {
  console.log(await signIn());
}
