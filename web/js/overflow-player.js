// The overflow tier's player (DESIGN.md §5): the room's low-latency channel, played with the IVS Player
// SDK, vendored by `make setup` (never a CDN) with its wasm worker. The same player plays a channel in
// AWS and the emulator's HLS locally. No DOM here beyond the <video> it is given.
//
// A channel is not live yet while its composition starts (the playlist answers 404): the player is
// loaded again after a pause until the stream plays, and again if it ends or fails later on.

const VENDOR = '/static/vendor/ivs-player';
const RETRY_SECONDS = 2;

let bundlePromise = null;

function loadPlayerBundle() {
  if (window.IVSPlayer) return Promise.resolve(window.IVSPlayer);
  if (!bundlePromise) {
    bundlePromise = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = `${VENDOR}/amazon-ivs-player.js`;
      script.async = true;
      script.onload = () =>
        window.IVSPlayer
          ? resolve(window.IVSPlayer)
          : reject(new Error('The IVS player loaded but did not define IVSPlayer.'));
      script.onerror = () => {
        bundlePromise = null;
        reject(new Error(`Could not load the IVS player from ${VENDOR} (did \`make setup\` run?).`));
      };
      document.head.appendChild(script);
    });
  }
  return bundlePromise;
}

export class OverflowPlayer {
  /**
   * @param {HTMLVideoElement} video
   * @param {(state: 'loading'|'playing'|'error', message?: string) => void} onState
   */
  constructor(video, onState) {
    this.video = video;
    this.onState = onState;
    this.player = null;
    this.url = null;
    this.retryTimer = null;
    this.stopped = false;
  }

  /** Plays `url` (again only if it changed). */
  async play(url) {
    if (this.url === url) return;
    this.url = url;
    this.stopped = false;
    this.onState('loading');
    let IVSPlayer;
    try {
      IVSPlayer = await loadPlayerBundle();
    } catch (error) {
      this.onState('error', error.message);
      return;
    }
    if (this.stopped || this.url !== url) return;
    if (!IVSPlayer.isPlayerSupported) {
      this.onState('error', 'This browser cannot run the IVS player (no WebAssembly).');
      return;
    }
    const origin = window.location.origin;
    const player = IVSPlayer.create({
      wasmWorker: `${origin}${VENDOR}/amazon-ivs-wasmworker.min.js`,
      wasmBinary: `${origin}${VENDOR}/amazon-ivs-wasmworker.min.wasm`,
    });
    this.player = player;
    player.attachHTMLVideoElement(this.video);
    player.setAutoplay(true);
    const { PlayerState, PlayerEventType } = IVSPlayer;
    player.addEventListener(PlayerState.PLAYING, () => this.onState('playing'));
    player.addEventListener(PlayerState.ENDED, () => this.reload('The stream ended'));
    player.addEventListener(PlayerEventType.ERROR, (error) =>
      this.reload(`The stream is not playing yet (${(error && error.type) || 'error'})`),
    );
    player.load(url);
  }

  reload(reason) {
    if (this.stopped || !this.player) return;
    this.onState('loading', reason);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      if (!this.stopped && this.player) this.player.load(this.url);
    }, RETRY_SECONDS * 1000);
  }

  /** The live stream's delay behind real time, in seconds, when the player knows it. */
  latencySeconds() {
    if (!this.player) return null;
    const latency = this.player.getLiveLatency();
    return Number.isFinite(latency) && latency > 0 ? latency : null;
  }

  stop() {
    this.stopped = true;
    this.url = null;
    clearTimeout(this.retryTimer);
    if (this.player) {
      this.player.delete();
      this.player = null;
      // Leaves the <video> empty for the Stage's tracks.
      this.video.removeAttribute('src');
      this.video.load();
    }
  }
}
