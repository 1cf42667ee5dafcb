"""What the evaluation shows: the HTML report, its pictures and plots, and the run summary."""
