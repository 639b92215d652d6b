"""Reports: the run folder's data for a report, rendering, plots and the HTML/Markdown writers."""
