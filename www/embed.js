// Shoal's embed: <script src="https://HOST/embed.js" data-task="digits" async></script>
// A consent card whose "Contribute" button is a frame from Shoal's origin: nothing loads
// before the visitor's click in it. Options (data-): task, position, throttle, theme.
(function () {
  'use strict';
  // What contributing to each task costs; the Shoal server writes it in when it serves
  // this file (served from elsewhere, the card states the cost in general terms).
  var COSTS = {};
  var me = document.currentScript;
  if (!me || !me.src) return;
  var origin = new URL(me.src).origin;
  var d = me.dataset;
  var pick = function (v, allowed, fallback) { return allowed.indexOf(v) >= 0 ? v : fallback; };
  var task = /^[a-z0-9-]{1,32}$/.test(d.task || '') ? d.task : 'digits';
  var position = pick(d.position, ['bottom-right', 'bottom-left', 'top-right', 'top-left'], 'bottom-right');
  var throttle = pick(d.throttle, ['25', '50', '100'], '50');
  var theme = pick(d.theme, ['light', 'dark'], 'light');
  var dark = theme === 'dark';
  var fg = dark ? '#f3f4f6' : '#111827';
  var bg = dark ? '#1f2937' : '#ffffff';
  var accent = '#0a7d8c';
  var sides = position.split('-');

  // Session storage may be denied (sandboxed or opaque-origin pages): then "No thanks"
  // lasts until the page is left.
  function declined() {
    try { return sessionStorage.getItem('shoal-declined') === task; } catch (e) { return false; }
  }

  function mount() {
    // Declined, or the script is on the page twice: one widget.
    if (declined() || document.querySelector('[data-shoal-widget="' + task + '"]')) return;
    var host = document.createElement('div');
    host.setAttribute('data-shoal-widget', task);
    host.style.cssText = 'position:fixed;z-index:2147483000;' + sides[0] + ':16px;' + sides[1] + ':16px;';
    // A shadow root keeps the host page's styles out of the widget and ours out of it.
    var root = host.attachShadow({ mode: 'open' });
    var card = document.createElement('div');
    card.setAttribute('role', 'dialog');
    card.setAttribute('aria-label', 'Shoal: help train a model');
    card.style.cssText = 'font:14px/1.4 system-ui,sans-serif;color:' + fg + ';background:' + bg +
      ';border:1px solid ' + accent + ';border-radius:10px;padding:12px 14px;width:280px;max-width:calc(100vw - 60px);' +
      'box-shadow:0 4px 16px rgba(0,0,0,.18)';
    var title = document.createElement('strong');
    title.textContent = 'Help train an AI model';
    var text = document.createElement('p');
    text.style.margin = '6px 0 10px';
    var cost = COSTS[task];
    var mb = function (n) { return (n / 1e6).toFixed(n < 1e7 ? 1 : 0) + ' MB'; };
    var local = Boolean(cost && cost.local);
    text.textContent = local
      ? 'This model trains on files you choose (they never leave your browser), on its own page: ' +
        '"Contribute" opens it in a new tab.'
      : 'While you read, your browser can train a small model together with other ' +
      'visitors (about ' + throttle + '% of the time, paused when the tab is hidden or Shoal is not in view). ' +
      (cost ? 'It downloads ' + mb(cost.download_bytes) + ' once, then ' +
        (cost.upload_mb_per_hour > 0 ? 'sends at most ' + cost.upload_mb_per_hour + ' MB an hour of updates and receives about as much, ' +
          'plus up to ' + Math.round(cost.upload_mb_per_hour / 2) + ' MB an hour of the model for other visitors and dashboards that ask. '
          : 'sends and receives up to ' + mb(cost.bytes_per_round) + ' per training round, ' +
            'plus up to ' + mb(cost.answer_bytes_per_hour) + ' an hour of the model for other visitors and dashboards that ask. ')
        : 'It downloads the training data once, then exchanges small updates. ') +
      (cost && cost.epsilon != null ? 'Updates are noised on your device before they leave (differential privacy, ' +
        'epsilon ' + cost.epsilon.toFixed(2) + ' at delta ' + cost.delta +
        (cost.on_budget === 'stop' ? ' at most). ' : ' at its budget, which it may pass). ') : '') +
      'Shoal\'s public ledger records an anonymous key for this browser, the site (it earns ' +
      'credit), and when and with which keys it trained; other visitors see your IP address.';
    var more = document.createElement('a');
    more.href = origin + '/?task=' + task;
    more.target = '_blank';
    more.rel = 'noopener';
    more.textContent = 'What is this?';
    more.style.color = accent;
    var row = document.createElement('div');
    row.style.cssText = 'display:flex;gap:8px;margin-top:10px';
    var no = button('No thanks', false);
    var yes;
    if (local) {
      // A task on the visitor's own files runs on Shoal's page, where its consent is.
      yes = button('Contribute', true);
      yes.addEventListener('click', function () {
        window.open(origin + '/?task=' + task, '_blank', 'noopener');
        host.remove();
      });
    } else {
      yes = document.createElement('iframe');
      yes.title = 'Shoal contributor';
      // The revision the card's terms are of: the frame trains only that one.
      var rev = cost && /^[0-9a-f]{32}$/.test(cost.revision || '') ? '&rev=' + cost.revision : '';
      yes.src = origin + '/embed.html?task=' + task + '&throttle=' + throttle + '&theme=' + theme + rev;
      // WebGPU (and the battery pause) in a cross-origin frame only where the page allows.
      yes.allow = 'webgpu; battery';
      yes.style.cssText = 'border:0;width:130px;height:40px;display:block;color-scheme:normal';
      // The frame says when the visitor clicked its button: it then shows Shoal's status.
      var consented = false;
      window.addEventListener('message', function (e) {
        if (e.origin !== origin || e.source !== yes.contentWindow) return;
        if (!e.data || e.data.shoal !== 'consented' || consented) return;
        consented = true;
        yes.style.width = '280px';
        yes.style.height = '190px';
        var stop = button('Stop', false);
        stop.style.marginTop = '8px';
        stop.addEventListener('click', function () { host.remove(); });
        // The frame stays where it is (a frame moved in the page reloads): the rest goes.
        [title, text, more, no].forEach(function (el) { el.remove(); });
        row.style.cssText = 'display:block';
        card.append(stop);
      });
    }
    row.append(yes, no);
    card.append(title, text, more, row);
    root.append(card);
    document.body.append(host);

    no.addEventListener('click', function () {
      try { sessionStorage.setItem('shoal-declined', task); } catch (e) { /* see declined() */ }
      host.remove();
    });
  }

  function button(label, primary) {
    var b = document.createElement('button');
    b.type = 'button';
    b.textContent = label;
    b.style.cssText = 'font:inherit;font-weight:600;padding:6px 12px;border-radius:6px;cursor:pointer;' +
      (primary ? 'border:0;background:' + accent + ';color:#fff' : 'background:transparent;color:' + fg + ';border:1px solid #9ca3af');
    return b;
  }

  if (document.body) mount();
  else document.addEventListener('DOMContentLoaded', mount);
})();
