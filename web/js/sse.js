// Server-sent events over fetch(): EventSource cannot send an Authorization header, so the publisher
// stream is read with a streamed body reader and parsed here (the HTML spec's event-stream format:
// lines split on CRLF, LF or CR; `event:`/`data:`/`id:` fields; a blank line dispatches; `:` comments
// ignored). No DOM and no knowledge of the events' meaning.

/** Incremental parser: feed() text as it arrives, get back the complete events it finished. */
export class SseParser {
  constructor() {
    this.buffer = '';
    this.pendingCr = false; // the last chunk ended in "\r": a following "\n" belongs to it
    this.reset();
    this.lastEventId = '';
  }

  reset() {
    this.type = '';
    this.data = [];
    this.hasData = false;
  }

  /** @returns {Array<{event: string, data: string, id: string}>} */
  feed(text) {
    if (this.pendingCr && text.startsWith('\n')) text = text.slice(1);
    this.pendingCr = false;
    this.buffer += text;
    const events = [];
    let start = 0;
    for (let i = 0; i < this.buffer.length; i += 1) {
      const ch = this.buffer[i];
      if (ch !== '\n' && ch !== '\r') continue;
      const event = this.line(this.buffer.slice(start, i));
      if (event) events.push(event);
      if (ch === '\r') {
        if (i + 1 === this.buffer.length) this.pendingCr = true;
        else if (this.buffer[i + 1] === '\n') i += 1;
      }
      start = i + 1;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  line(line) {
    if (line === '') {
      if (!this.hasData) {
        this.reset();
        return null;
      }
      const event = { event: this.type || 'message', data: this.data.join('\n'), id: this.lastEventId };
      this.reset();
      return event;
    }
    if (line.startsWith(':')) return null; // comment (keep-alive)
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.type = value;
    else if (field === 'data') {
      this.data.push(value);
      this.hasData = true;
    } else if (field === 'id' && !value.includes('\0')) this.lastEventId = value;
    return null; // `retry` and unknown fields are ignored: the caller owns reconnection
  }
}

/** The stream answered with an HTTP error before any event: status and the server's error body. */
export class StreamHttpError extends Error {
  constructor(message, { status, code, retryAfterSeconds }) {
    super(message);
    this.name = 'StreamHttpError';
    this.status = status;
    this.code = code;
    this.retryAfterSeconds = retryAfterSeconds;
  }
}

async function httpError(response) {
  let error = {};
  try {
    const payload = JSON.parse(await response.text());
    if (payload && payload.error) error = payload.error;
  } catch {
    // not JSON: keep the status only
  }
  const retryAfter = Number(response.headers.get('Retry-After'));
  return new StreamHttpError(error.message || `the event stream failed (HTTP ${response.status})`, {
    status: response.status,
    code: error.code || `http_${response.status}`,
    retryAfterSeconds: Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : null,
  });
}

/**
 * Reads one event stream until it ends. Resolves when the server closes it; rejects on HTTP errors
 * (StreamHttpError), network errors, abort (AbortError) or when nothing at all (not even a comment)
 * arrived for `idleTimeoutMs`.
 *
 * @param {string} url
 * @param {object} options
 * @param {Record<string, string>} [options.headers]
 * @param {AbortSignal} [options.signal]
 * @param {() => void} [options.onOpen]  the server accepted the stream
 * @param {(event: {event: string, data: string, id: string}) => void} options.onEvent
 * @param {number} [options.idleTimeoutMs]
 */
export async function readEventStream(url, { headers = {}, signal, onOpen, onEvent, idleTimeoutMs = 0 }) {
  const local = new AbortController();
  const abort = () => local.abort(signal.reason);
  if (signal) {
    if (signal.aborted) abort();
    else signal.addEventListener('abort', abort, { once: true });
  }
  let idleTimer = null;
  let idle = false;
  const touch = () => {
    if (!idleTimeoutMs) return;
    clearTimeout(idleTimer);
    idleTimer = setTimeout(() => {
      idle = true;
      local.abort();
    }, idleTimeoutMs);
  };

  try {
    touch();
    const response = await fetch(url, {
      headers: { Accept: 'text/event-stream', ...headers },
      cache: 'no-store',
      signal: local.signal,
    });
    if (!response.ok) throw await httpError(response);
    const type = response.headers.get('Content-Type') || '';
    if (!type.startsWith('text/event-stream')) {
      throw new StreamHttpError(`the server answered ${type || 'no content type'}, not an event stream`, {
        status: response.status,
        code: 'not_event_stream',
        retryAfterSeconds: null,
      });
    }
    if (onOpen) onOpen();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      touch();
      for (const event of parser.feed(value)) onEvent(event);
    }
  } catch (error) {
    if (idle && !(signal && signal.aborted)) {
      throw new Error(`no data for ${Math.round(idleTimeoutMs / 1000)} s`);
    }
    throw error;
  } finally {
    clearTimeout(idleTimer);
    local.abort(); // releases the connection if onEvent threw
    if (signal) signal.removeEventListener('abort', abort);
  }
}
