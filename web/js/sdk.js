// The one place that decides which Stage implementation the pages use (DESIGN.md §8).
//  - aws:   the real amazon-ivs-web-broadcast bundle, vendored by `make setup` (never a CDN).
//  - local: local-stage.js, a stand-in with the same surface (Stage, LocalStageStream, SubscribeType,
//           StageEvents, ...) that joins the IVS emulator's events socket and sends media browser to
//           browser. The pages' own code is the same in both modes.

const VENDOR_BUNDLE = '/static/vendor/amazon-ivs-web-broadcast.js';

let bundlePromise = null;

function loadVendorBundle() {
  if (window.IVSBroadcastClient) return Promise.resolve(window.IVSBroadcastClient);
  if (!bundlePromise) {
    bundlePromise = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = VENDOR_BUNDLE;
      script.async = true;
      script.onload = () =>
        window.IVSBroadcastClient
          ? resolve(window.IVSBroadcastClient)
          : reject(new Error('The IVS SDK loaded but did not define IVSBroadcastClient.'));
      script.onerror = () => {
        bundlePromise = null;
        reject(new Error(`Could not load the IVS SDK from ${VENDOR_BUNDLE} (did \`make setup\` run?).`));
      };
      document.head.appendChild(script);
    });
  }
  return bundlePromise;
}

/** Resolves to the SDK namespace for `config.mode`. */
export async function loadStageSdk(config) {
  if (config.mode === 'aws') return loadVendorBundle();
  return import('./local-stage.js');
}

// Names for StageErrorCode values, for when an implementation has no reverse enum mapping.
const STAGE_ERROR_NAMES = {
  1: 'TOKEN_MALFORMED',
  2: 'TOKEN_EXPIRED',
  3: 'TIMEOUT',
  4: 'FAILED',
  5: 'CANCELED',
  6: 'STAGE_AT_CAPACITY',
  7: 'CODEC_MISMATCH',
  8: 'TOKEN_NOT_ALLOWED',
  9: 'STAGE_DELETED',
  10: 'PARTICIPANT_DISCONNECTED',
  11: 'TOKEN_EXCHANGE_REQUEST_INVALID',
  12: 'TOKEN_EXCHANGE_FAILED',
};

export function stageErrorName(sdk, code) {
  const fromSdk = sdk && sdk.StageErrorCode ? sdk.StageErrorCode[code] : undefined;
  return typeof fromSdk === 'string' ? fromSdk : STAGE_ERROR_NAMES[code] || `code ${code}`;
}

/** One line for humans; the SDK's messages never contain the token. */
export function describeStageError(sdk, error) {
  if (!error) return 'unknown error';
  if (typeof error.code !== 'number') return String(error.message || error);
  const name = stageErrorName(sdk, error.code);
  const category = error.category ? `, ${error.category}` : '';
  // The SDK prefixes its messages with the category ("[JOIN_ERROR] ..."); it is shown once already.
  const text = String(error.message || '').replace(/^\[[A-Z_]+\]\s*/, '');
  const message = text ? `: ${text}` : '';
  return `${name} (code ${error.code}${category})${message}`;
}
