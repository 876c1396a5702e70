"""kyphowatch: adverse-event surveillance for balloon kyphoplasty registries.

Everything importable lives here; the Airflow DAGs in ``dags/`` only wire calls
to these modules. Nothing in this package imports Airflow.
"""

__version__ = "0.1.0"
