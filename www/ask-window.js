// The widget's consent in a window of Shoal's own (README, "Embedding Shoal on your
// site"), where the browser cannot tell whether the page around the frame shows it (no
// IntersectionObserver v2: Firefox, Safari): there a page could lay the frame,
// transparent, over a decoy and take the visitor's click on the decoy for consent. The
// frame opens consent.html at the click; that window's button, and nothing the page can
// send, starts Shoal. Loaded only after such a click.

/** Waits for the answer of `opened`, the window the click opened (null: none could
 *  open): `begin()` on consent, the button back when it closes without one. */
export function askInWindow(opened, { task, button, refused, stand, begin }) {
  button.hidden = true;
  if (!opened) {
    stand('refused');
    refused.hidden = false;
    // Blocked pop-ups, or a page whose opener policy (COOP same-origin) keeps its frames
    // from holding the windows they open.
    refused.textContent = 'Shoal\'s window could not open here (pop-ups blocked, or this page keeps them from Shoal): open Shoal\'s own page to contribute.';
    setTimeout(() => { button.hidden = false; refused.hidden = true; }, 4000);
    return;
  }
  stand('window');
  const pending = document.createElement('p');
  pending.style.cssText = 'font-size:12px;margin:4px 0 0';
  pending.setAttribute('aria-live', 'polite');
  pending.textContent = 'Confirm in Shoal\'s window to start.';
  button.after(pending);
  let waiting = true;
  const done = () => {
    waiting = false;
    pending.remove();
    removeEventListener('message', onMessage);
  };
  const onMessage = (e) => {
    if (!waiting || e.source !== opened || e.origin !== location.origin) return;
    if (e.data?.shoal !== 'consent' || e.data.task !== task) return;
    done();
    try { opened.close(); } catch { /* closed already */ }
    begin();
  };
  addEventListener('message', onMessage);
  // Closed without consent (seen closed twice in a row: the consent message may still be
  // on its way when the window is): the button comes back.
  let closedOnce = false;
  const watch = setInterval(() => {
    if (waiting && !(opened.closed && closedOnce)) {
      closedOnce = opened.closed;
      return;
    }
    clearInterval(watch);
    if (!waiting) return;
    done();
    button.hidden = false;
    stand('asked');
  }, 500);
}
