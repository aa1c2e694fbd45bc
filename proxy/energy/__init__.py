"""Energy: power sources, timelines, attribution, the live meter."""
