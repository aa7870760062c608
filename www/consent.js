// How a consent button tells a press the visitor meant from one a page arranged for them,
// for the widget's frame (embed.html) and the contributor page (contribute.js): a key
// press must come a while after the button took the focus, with no other keys typed onto
// it; a mouse press must come after the pointer moved onto the button; and an address
// fragment (`#contribute`, `#consent`), which focuses the button for the visitor's next
// Space, is dropped with that focus.

/** How long the button must have held the focus (or, in the widget, been visible) before
 *  a press counts. */
export const SEEN_MS = 500;

/** What the visitor is told of a refused press, by reason. */
export const REFUSED = {
  keyTooSoon: 'Shoal\'s button was pressed as it took the focus: press it again in a moment.',
  typed: 'Shoal\'s button had keys typed onto it: Tab back to it to press it.',
  unmoved: 'Shoal\'s button was clicked where the pointer had not moved onto it: move onto it and click again.',
};

/**
 * Watches `button`'s focus, keys and pointer and the page's address fragment. Returns
 * `judge(click)`, to call once at each trusted click: `{keyTooSoon, typed, unmoved}`,
 * each true when that reason refuses the press; and `forget()`, for a click that is not
 * judged (it clears what the last press left).
 */
export function guardPresses(button) {
  // A key (Enter, Space) presses it only once it has held the focus SEEN_MS: the Tab out
  // of a field of the page's own lands here, and the next keystroke is no consent. Nor
  // after other keys typed onto it, nor a key held down.
  let focusedSince = null;
  let keyAt = null;
  let typedOn = false;
  button.addEventListener('focus', (event) => { focusedSince = event.timeStamp; typedOn = false; });
  button.addEventListener('blur', () => { focusedSince = null; keyAt = null; });
  // A press never focuses it (Chromium's would: pressed and dragged off, no click, the
  // next Space pressed it).
  button.addEventListener('mousedown', (event) => event.preventDefault());
  // Nor does the window's focus coming back (a page may hand it back): a Space then,
  // meant for the page, is no consent. They Tab to it again.
  addEventListener('blur', () => { if (document.activeElement === button) button.blur(); });
  button.addEventListener('keydown', (event) => {
    if ((event.key === 'Enter' || event.key === ' ') && !event.repeat) keyAt = event.timeStamp;
    else if (event.repeat || event.key.length === 1) typedOn = true;
  });
  // A fragment put in our address focuses the button: drop it and that focus, or the
  // visitor's next Space presses it.
  const unfocus = () => {
    if (!location.hash) return;
    history.replaceState(null, '', location.pathname + location.search);
    if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
  };
  addEventListener('hashchange', unfocus);
  unfocus();
  // A mouse press where the pointer came over the button without moving there does not
  // count: a window of another page's, closed at the first press of a "double-click",
  // leaves it resting on the button. (Assistive tools' presses come with no pointer over
  // the button at all, and count.)
  let over = false;
  let movedOver = false;
  let lastMove = null;
  let pressedUnmoved = false;
  button.addEventListener('pointerover', (event) => { if (event.isTrusted) over = true; });
  button.addEventListener('pointermove', (event) => {
    if (!event.isTrusted) return;
    const at = [event.screenX, event.screenY];
    if (event.movementX || event.movementY || (lastMove && (lastMove[0] !== at[0] || lastMove[1] !== at[1]))) movedOver = true;
    lastMove = at;
  });
  button.addEventListener('pointerleave', () => { over = false; movedOver = false; lastMove = null; pressedUnmoved = false; });
  button.addEventListener('pointercancel', () => { pressedUnmoved = false; });
  button.addEventListener('pointerdown', (event) => {
    pressedUnmoved = event.pointerType === 'mouse' && over && !movedOver;
  });
  const forget = () => { keyAt = null; pressedUnmoved = false; };
  const judge = (event) => {
    // A click of a key, not of a pointer (which focuses the button as it presses).
    const pressedAt = event.detail === 0 ? keyAt : null;
    const keyTooSoon = pressedAt !== null
      && (focusedSince === null || pressedAt - focusedSince < SEEN_MS);
    const typed = (pressedAt !== null || event.detail === 0) && typedOn;
    const unmoved = event.detail > 0 && pressedUnmoved;
    forget();
    return { keyTooSoon, typed, unmoved };
  };
  return { judge, forget };
}
