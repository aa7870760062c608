// The consent button's guard for the widget's frame and the contributor page (README,
// "Site owners": keys after SEEN_MS of focus, none typed on; pointer moved onto it).

export const SEEN_MS = 500;

export const REFUSED = {
  keyTooSoon: 'Shoal\'s button was pressed as it took the focus: press it again in a moment.',
  typed: 'Shoal\'s button had keys typed onto it: Tab back to it to press it.',
  unmoved: 'Shoal\'s button was clicked where the pointer had not moved onto it: move onto it and click again.',
};

/** What to tell the visitor about a press `judge` refused, or null if it passed. */
export const refusal = (verdict) => REFUSED[['keyTooSoon', 'typed', 'unmoved'].find((why) => verdict[why])] ?? null;

/** Watches `button`; returns `judge(click)` ({keyTooSoon, typed, unmoved}, called once at
 *  each trusted click) and `forget()` (for a click not judged). */
export function guardPresses(button) {
  let focusedSince = null;
  let keyAt = null;
  let typedOn = false;
  button.addEventListener('focus', (e) => { focusedSince = e.timeStamp; typedOn = false; });
  button.addEventListener('blur', () => { focusedSince = null; keyAt = null; });
  // A press never focuses it, nor does the window's focus coming back.
  button.addEventListener('mousedown', (e) => e.preventDefault());
  addEventListener('blur', () => { if (document.activeElement === button) button.blur(); });
  button.addEventListener('keydown', (e) => {
    if ((e.key === 'Enter' || e.key === ' ') && !e.repeat) keyAt = e.timeStamp;
    else if (e.repeat || e.key.length === 1) typedOn = true;
  });
  const unfocus = () => {
    if (!location.hash) return;
    history.replaceState(null, '', location.pathname + location.search);
    if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
  };
  addEventListener('hashchange', unfocus);
  unfocus();
  // A window closed at a "double-click"'s first press leaves the pointer resting there.
  let over = false;
  let moved = false;
  let last = null;
  let unmoved = false;
  button.addEventListener('pointerover', (e) => { if (e.isTrusted) over = true; });
  button.addEventListener('pointermove', (e) => {
    if (!e.isTrusted) return;
    if (e.movementX || e.movementY || (last && (last[0] !== e.screenX || last[1] !== e.screenY))) moved = true;
    last = [e.screenX, e.screenY];
  });
  button.addEventListener('pointerleave', () => { over = false; moved = false; last = null; unmoved = false; });
  button.addEventListener('pointercancel', () => { unmoved = false; });
  button.addEventListener('pointerdown', (e) => { unmoved = e.pointerType === 'mouse' && over && !moved; });
  const forget = () => { keyAt = null; unmoved = false; };
  const judge = (e) => {
    // A key's click has no pointer detail.
    const pressedAt = e.detail === 0 ? keyAt : null;
    const verdict = {
      keyTooSoon: pressedAt !== null && (focusedSince === null || pressedAt - focusedSince < SEEN_MS),
      typed: (pressedAt !== null || e.detail === 0) && typedOn,
      unmoved: e.detail > 0 && unmoved,
    };
    forget();
    return verdict;
  };
  return { judge, forget };
}
