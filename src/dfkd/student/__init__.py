"""The student's side of distillation: its loss (`--loss`), how an online method's batch moves
its weights (`--update`), and where its weights start (`--student-init`)."""
