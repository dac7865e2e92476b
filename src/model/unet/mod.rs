//! UNet2DConditionModel (placeholder; being written).
