variable "name" {
  description = "Prefix of every resource name."
  type        = string
  default     = "fleetml"
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "vpc_cidr" {
  type    = string
  default = "10.40.0.0/16"
}

variable "azs" {
  description = "Availability zones (one public and one private subnet each)."
  type        = list(string)
  default     = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
}

variable "node_count" {
  description = "fleetml nodes (the auto-scaling group keeps this many)."
  type        = number
  default     = 3
}

variable "instance_type" {
  description = "Node size: see docs/performance.md for measurements per core."
  type        = string
  default     = "c7g.large"
}

variable "ami_id" {
  description = "A Debian 12 image with fleetml installed (built by your image pipeline)."
  type        = string
}

variable "db_instance_class" {
  type    = string
  default = "db.t4g.medium"
}

variable "db_password" {
  description = "Master password of the PostgreSQL instance (pass through TF_VAR_db_password)."
  type        = string
  sensitive   = true
}

variable "api_certificate_arn" {
  description = "ACM certificate for the API listener (TLS terminated at the NLB)."
  type        = string
}
