// The host app's admission ticket for this page (README, "Admission by the host app"). It arrives in
// the URL fragment, `#ticket=<jwt>` (a fragment reaches no server log and no Referer), or, when the
// page is embedded, in a message from the embedding window:
//
//   iframe.contentWindow.postMessage({ type: 'fanout:ticket', ticket: '<jwt>' }, '<gateway origin>')
//
// accepted only when this page runs in a frame and the message comes from its parent window. When
// the gateway refuses the ticket (or wants one and there is none), the page tells the parent:
//
//   { type: 'fanout:ticket-expired', page: 'watch' | 'broadcast', code: 'invalid_ticket' | 'ticket_required' }
//
// posted to the origin the last ticket came from ('*' before any did: the message holds no secret),
// once per ticket, so a host app that does not answer is not flooded. The ticket stays in memory:
// never stored, logged or shown. Its claims are read (unverified) only to prefill the room.

export const TICKET_MESSAGE = 'fanout:ticket';
export const TICKET_EXPIRED_MESSAGE = 'fanout:ticket-expired';

// Three base64url parts with a signature: `alg: none` tickets are refused anyway, so not accepted here.
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;
const MAX_TICKET_CHARS = 8192;

function base64UrlJson(part) {
  const base64 = part.replace(/-/g, '+').replace(/_/g, '/');
  const bytes = Uint8Array.from(atob(base64 + '='.repeat((4 - (base64.length % 4)) % 4)), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

export class TicketHolder {
  /** @param {object} options @param {'watch'|'broadcast'} options.page  named in the messages to the parent */
  constructor({ page }) {
    this.page = page;
    this.current = null;
    this.embedded = window.parent !== window;
    this.parentOrigin = null; // where the last ticket message came from
    this.askedFor = undefined; // the ticket (null: none) a new one was last asked for
    this.listeners = new Set();
  }

  /** Takes a ticket from the fragment now and from later fragments and parent messages. Call it
   * while the page's module runs, before any await, so a message posted on the frame's load counts. */
  listen() {
    this.fromFragment();
    window.addEventListener('hashchange', () => this.fromFragment());
    if (this.embedded) window.addEventListener('message', (event) => this.fromMessage(event));
  }

  fromFragment() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    if (!params.has('ticket')) return;
    const ticket = params.get('ticket');
    // Out of the address bar and the history, so it is not bookmarked, shared or shown.
    params.delete('ticket');
    const rest = params.toString();
    const url = `${window.location.pathname}${window.location.search}${rest ? `#${rest}` : ''}`;
    window.history.replaceState(window.history.state, '', url);
    this.set(ticket);
  }

  fromMessage(event) {
    if (event.source !== window.parent) return;
    const data = event.data;
    if (!data || typeof data !== 'object' || data.type !== TICKET_MESSAGE) return;
    if (this.set(data.ticket)) this.parentOrigin = event.origin;
  }

  set(ticket) {
    if (typeof ticket !== 'string' || ticket.length > MAX_TICKET_CHARS || !JWT_SHAPE.test(ticket)) {
      console.warn('ignored an admission ticket that is not a signed JWT');
      return false;
    }
    if (ticket !== this.current) {
      this.current = ticket;
      for (const listener of [...this.listeners]) listener(ticket);
    }
    return true;
  }

  /** Calls `listener(ticket)` for every new ticket; returns the function that stops it. */
  onTicket(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Asks the embedding window for a (new) ticket, once per ticket held. `code` is the gateway's:
   * `ticket_required` or `invalid_ticket`. False when there is nobody to ask (not embedded).
   */
  requestNew(code) {
    if (!this.embedded) return false;
    if (this.askedFor !== this.current) {
      this.askedFor = this.current;
      window.parent.postMessage({ type: TICKET_EXPIRED_MESSAGE, page: this.page, code }, this.parentOrigin || '*');
    }
    return true;
  }

  /**
   * Asks for a new ticket and resolves true once one arrives; false when nobody can be asked, on
   * abort, or after `timeoutMs` (0: no limit).
   */
  renewed(code, { signal, timeoutMs = 0 } = {}) {
    if (!this.requestNew(code)) return Promise.resolve(false);
    return new Promise((resolve) => {
      let timer = null;
      const done = (value) => {
        clearTimeout(timer);
        stopListening();
        if (signal) signal.removeEventListener('abort', aborted);
        resolve(value);
      };
      const aborted = () => done(false);
      const stopListening = this.onTicket(() => done(true));
      if (timeoutMs) timer = setTimeout(() => done(false), timeoutMs);
      if (signal) {
        if (signal.aborted) done(false);
        else signal.addEventListener('abort', aborted, { once: true });
      }
    });
  }

  /** The ticket's room and role as it claims them, unverified (the gateway decides); null if unreadable. */
  claims() {
    if (!this.current) return null;
    try {
      const payload = base64UrlJson(this.current.split('.')[1]);
      return {
        room: typeof payload.room === 'string' ? payload.room : null,
        role: typeof payload.role === 'string' ? payload.role : null,
      };
    } catch {
      return null;
    }
  }
}

/** The gateway's answer means the ticket must be replaced (or one is missing): 401 with a ticket code. */
export function isTicketRefusal(error) {
  return Boolean(error) && error.status === 401 && (error.code === 'invalid_ticket' || error.code === 'ticket_required');
}
