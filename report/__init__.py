"""Run reports: the expert-load record format, the numbers and figures of `launch report`, its HTML page."""
