// The contributor page: everything lives in contribute.js (shared with the widget's frame).
import { contributor } from './contribute.js';

const task = new URLSearchParams(location.search).get('task') ?? 'digits';
contributor({ task: /^[a-z0-9-]{1,32}$/.test(task) ? task : 'digits' });
