"""The dashboard (contract section 9): one page, live over Server-Sent Events.

- :mod:`~nexus.dashboard.timeseries`: the charts' 10-second buckets (a recorder, O(1));
- :mod:`~nexus.dashboard.hub`: the event streams, a bounded queue per subscriber;
- :mod:`~nexus.dashboard.live`: what the page shows and the events that update it;
- :mod:`~nexus.dashboard.page`: the server-rendered HTML (readable without JavaScript);
- :mod:`~nexus.dashboard.assets`: the static files in ``assets/`` (CSS, script, icon);
- :mod:`~nexus.dashboard.web`: the HTTP answers and the access rule.
"""

from __future__ import annotations

from nexus.dashboard.web import Dashboard

__all__ = ["Dashboard"]
