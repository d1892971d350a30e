"""The job-kind catalog: each module is one kind of work a volunteer agent will run."""
