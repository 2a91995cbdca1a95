import * as api from './api.js';
import { setText } from './dom.js';
import { clock, errorText, refreshTimes } from './format.js';
import { mountFleet } from './fleet.js';
import { mountDevice } from './device.js';
import { mountUpgrades, mountUpgradeTask } from './upgrades.js';
import { mountDistribution, mountDistributionTask } from './distribution.js';

const POLL_MS = 2000;

// [pattern, mount, nav link id]
const routes = [
  [/^#\/fleet(?:\/([^/]+))?$/, mountFleet, 'nav-fleet'],
  [/^#\/device\/([^/]+)\/([^/]+)$/, mountDevice, 'nav-fleet'],
  [/^#\/upgrades$/, mountUpgrades, 'nav-upgrades'],
  [/^#\/upgrade\/([^/]+)$/, mountUpgradeTask, 'nav-upgrades'],
  [/^#\/distribution$/, mountDistribution, 'nav-distribution'],
  [/^#\/distribution\/([^/]+)$/, mountDistributionTask, 'nav-distribution'],
];

const $ = (id) => document.getElementById(id);
const pageRoot = $('page');

let page = null;
// Bumped on every route change or sign-out, so a refresh still in flight for the old page
// neither reports nor schedules anything.
let generation = 0;
let timer = 0;
let running = false;
let again = false;

const banner = { fromPoll: false, dismissed: null };

function showError(err, { fromPoll = false } = {}) {
  const text = errorText(err);
  if (fromPoll && banner.dismissed === text) return;
  banner.fromPoll = fromPoll;
  setText($('error-text'), text);
  $('error').hidden = false;
}

function clearError() {
  $('error').hidden = true;
  setText($('error-text'), '');
}

$('error-dismiss').addEventListener('click', () => {
  // A dismissed polling error stays dismissed until the message changes.
  if (banner.fromPoll) banner.dismissed = $('error-text').textContent;
  clearError();
});

async function tick(gen) {
  if (gen !== generation) return;
  clearTimeout(timer);
  if (running) {
    again = true;
    return;
  }
  if (!document.hidden && page) {
    running = true;
    try {
      await page.refresh();
      if (gen === generation) {
        refreshTimes(pageRoot);
        setLive(true);
        banner.dismissed = null;
        if (banner.fromPoll) clearError();
      }
    } catch (e) {
      if (gen === generation) {
        setLive(false);
        showError(e, { fromPoll: true });
      }
    } finally {
      running = false;
    }
  }
  if (gen !== generation) return;
  if (again) {
    again = false;
    tick(gen);
  } else {
    timer = setTimeout(() => tick(gen), POLL_MS);
  }
}

function setLive(ok) {
  const live = $('live');
  live.hidden = false;
  live.classList.toggle('stale', !ok);
  setText(live, ok ? `updated ${clock()}` : `update failed ${clock()}`);
}

const ctx = {
  refreshNow: () => tick(generation),
  showError: (err) => showError(err),
  clearError,
};

function route() {
  generation++;
  clearTimeout(timer);
  page = null;
  if (!api.token.get()) return showSignIn();
  showApp();
  const hash = location.hash || '#/fleet';
  for (const [pattern, mount, nav] of routes) {
    const match = pattern.exec(hash);
    if (!match) continue;
    for (const link of $('nav').querySelectorAll('a')) {
      if (link.id === nav) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    clearError();
    banner.dismissed = null;
    pageRoot.replaceChildren();
    window.scrollTo(0, 0);
    const params = match.slice(1).map((p) => (p === undefined ? undefined : decodeURIComponent(p)));
    page = mount(pageRoot, ctx, ...params);
    tick(generation);
    return;
  }
  location.replace('#/fleet');
}

function showSignIn(message) {
  $('nav').hidden = true;
  $('signout').hidden = true;
  $('live').hidden = true;
  pageRoot.hidden = true;
  pageRoot.replaceChildren();
  clearError();
  $('signin-view').hidden = false;
  const error = $('signin-error');
  error.hidden = !message;
  setText(error, message ?? '');
  $('token').focus();
}

function showApp() {
  $('signin-view').hidden = true;
  $('nav').hidden = false;
  $('signout').hidden = false;
  pageRoot.hidden = false;
}

api.onUnauthorized((err) => {
  api.token.clear();
  generation++;
  page = null;
  showSignIn(errorText(err));
});

$('signin').addEventListener('submit', async (event) => {
  event.preventDefault();
  const button = event.submitter ?? $('signin').querySelector('button');
  button.disabled = true;
  try {
    await api.signIn($('token').value.trim());
    $('token').value = '';
    route();
    pageRoot.focus({ preventScroll: true });
  } catch (e) {
    const error = $('signin-error');
    error.hidden = false;
    setText(error, errorText(e));
  } finally {
    button.disabled = false;
  }
});

$('signout').addEventListener('click', () => {
  api.token.clear();
  route();
});

window.addEventListener('hashchange', route);
// A tab in the background does not poll; coming back refreshes at once.
document.addEventListener('visibilitychange', () => {
  if (!document.hidden) tick(generation);
});

route();
