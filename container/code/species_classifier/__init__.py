"""Species classifier: stratified K-fold efficientnet_b1, trained and served from one SageMaker image."""
