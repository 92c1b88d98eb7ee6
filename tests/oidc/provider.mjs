// A real OpenID provider for sessiongate's sign-in tests: the certified `oidc-provider`
// package, with its own login form (devInteractions: any password is accepted; the
// login is the account id). Started by the tests in a namespace of their own:
//
//   node provider.mjs --listen HOST:PORT --issuer URL --redirect-uri URL \
//        --client-id ID --client-secret SECRET [--groups ACCOUNT=G1,G2 ...]
//        [--tls-cert PEM --tls-key PEM]   (HTTPS, with a test CA's certificate)
//
// Prints "ready" on stdout once listening; stops on SIGTERM.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import https from 'node:https';
import Provider from 'oidc-provider';

function args(argv) {
  const out = { groups: {} };
  for (let i = 2; i < argv.length; i += 2) {
    const [name, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${name} needs a value`);
    if (name === '--groups') {
      const [account, list] = value.split('=');
      out.groups[account] = list ? list.split(',') : [];
    } else {
      out[name.replace(/^--/, '').replace(/-/g, '_')] = value;
    }
  }
  for (const needed of ['listen', 'issuer', 'redirect_uri', 'client_id', 'client_secret']) {
    if (!out[needed]) throw new Error(`--${needed.replace(/_/g, '-')} is required`);
  }
  return out;
}

const opts = args(process.argv);
// A signing key of this process's own: a provider started again signs with another
// key, as a real one does after a rotation (the package's quick-start keys never change).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };
const provider = new Provider(opts.issuer, {
  jwks: { keys: [signingKey] },
  clients: [
    {
      client_id: opts.client_id,
      client_secret: opts.client_secret,
      redirect_uris: [opts.redirect_uri],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      // The ID token always says when the user last signed in.
      require_auth_time: true,
    },
  ],
  pkce: { required: () => true },
  // Claims of the requested scopes go into the ID token itself.
  conformIdTokenClaims: false,
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'groups'],
  },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: `${id}@example.com`,
          email_verified: true,
          name: id,
          groups: opts.groups[id] ?? [],
        };
      },
    };
  },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

const [host, port] = [opts.listen.slice(0, opts.listen.lastIndexOf(':')), Number(opts.listen.slice(opts.listen.lastIndexOf(':') + 1))];
const listenHost = host.replace(/^\[|\]$/g, '');
const ready = () => console.log('ready');
const server = opts.tls_cert
  ? https
      .createServer(
        { cert: readFileSync(opts.tls_cert), key: readFileSync(opts.tls_key) },
        provider.callback(),
      )
      .listen(port, listenHost, ready)
  : provider.listen(port, listenHost, ready);
process.on('SIGTERM', () => server.close(() => process.exit(0)));
